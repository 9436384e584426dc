"""Synthetic image workloads for the serving benchmark (like SGLang's `--dataset-name image` and vLLM's
`random-mm`): random-token prompts of a set length, N generated images per request, and each request's
text and vision token counts from the model's own tokenizer and image processor."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

RESOLUTIONS = {"720p": (1280, 720), "1080p": (1920, 1080)}


@dataclass
class BenchRequest:
    prompt: str
    images: list[bytes]
    max_tokens: int
    text_tokens: int = 0
    image_tokens: int = 0
    ignore_eos: bool = False  # generate exactly max_tokens


def parse_resolution(text: str) -> tuple[int, int]:
    if text in RESOLUTIONS:
        return RESOLUTIONS[text]
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise ValueError(f"resolution {text!r}: use 720p, 1080p or WxH")
    return int(m.group(1)), int(m.group(2))


def make_image(width: int, height: int, rng: np.random.Generator, fmt: str = "jpeg", content: str = "random") -> bytes:
    if content == "blank":
        pixels = np.full((height, width, 3), 255, np.uint8)
    else:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG" if fmt == "jpeg" else "PNG")
    return buf.getvalue()


def make_dataset(model: str | Path, num_prompts: int, input_len: int = 64, output_len: int = 32,
                 image_count: int = 1, random_image_count: bool = False, resolution: str = "720p",
                 image_format: str = "jpeg", image_content: str = "random", seed: int = 0,
                 ignore_eos: bool = False) -> list[BenchRequest]:
    from .hf_baseline import HFInputs

    inputs = HFInputs(model)
    tokenizer = inputs.tokenizer
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    rng = np.random.default_rng(seed)
    width, height = parse_resolution(resolution)
    requests = []
    for _ in range(num_prompts):
        prompt = tokenizer.decode(rng.choice(vocab, size=input_len).tolist())
        n = int(rng.integers(1, image_count + 1)) if random_image_count else image_count
        images = [make_image(width, height, rng, image_format, image_content) for _ in range(n)]
        content = [{"type": "image"}] * n + [{"type": "text", "text": prompt}]
        templated = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        requests.append(BenchRequest(prompt, images, output_len, len(templated) - n, inputs.image_tokens(images),
                                     ignore_eos))
    return requests
