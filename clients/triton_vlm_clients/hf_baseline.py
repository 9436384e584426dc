"""The naive baseline: plain transformers `generate`, in-process, one request at a time.

Uses only transformers (the tokenizer, the slow image processor and the processors' own placeholder
expansion: InternVL's and GLM-4.1V's combined processors themselves, the Qwen-VL processors' rule),
none of triton-vlm's serving code, so it is also the yardstick of the parity tests.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
from transformers.generation.streamers import BaseStreamer


@dataclass
class Generation:
    output_ids: list[int]
    token_times_s: list[float] = field(default_factory=list)  # from the call, one per new token
    total_s: float = 0.0


class _Clock(BaseStreamer):
    """generate() calls put() with the prompt first, then once per new token."""

    def __init__(self, start: float) -> None:
        self.start, self.times, self._prompt_seen = start, [], False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter() - self.start)
        self._prompt_seen = True

    def end(self) -> None:
        pass


COMBINED = {"internvl": "InternVLProcessor", "glm4v": "Glm4vProcessor", "glm4v_moe": "Glm4vProcessor"}


def combined_processor(path, model_type: str, image_processor, tokenizer):
    """The family's own combined processor for images and text, without its video processor (which needs
    torchvision)."""
    base = getattr(transformers, COMBINED[model_type])
    images_only = type(base.__name__, (base,), {"attributes": ["image_processor", "tokenizer"]})
    config = Path(path) / "processor_config.json"
    kwargs = json.loads(config.read_text()) if config.exists() else {}
    kwargs.pop("processor_class", None)
    return images_only(image_processor, tokenizer, None, **kwargs)


def slow_processor_kwargs(path) -> dict:
    """Qwen3-VL's processor configs give the pixel budget only as `size`; the fast processor (which needs
    torchvision) honours it and the slow one in transformers 4.57 drops it, so tell the slow one."""
    config = json.loads((Path(path) / "preprocessor_config.json").read_text())
    size = config.get("size") or {}
    if not config.get("image_processor_type", "").startswith("Qwen2VLImageProcessor") or "min_pixels" in config \
            or not {"shortest_edge", "longest_edge"} <= size.keys():
        return {}  # GLM's slow processor reads `size` itself
    return {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}


class HFInputs:
    """A model's inputs as transformers builds them (tokenizer, slow image processor, the family's own
    placeholder expansion), without its weights."""

    def __init__(self, path) -> None:
        self.config = transformers.AutoConfig.from_pretrained(path)
        self.model_type = self.config.model_type
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.processor = AutoImageProcessor.from_pretrained(path, use_fast=False, **slow_processor_kwargs(path))
        self.combined = None
        if self.model_type in COMBINED:
            self.combined = combined_processor(path, self.model_type, self.processor, self.tokenizer)

    def __call__(self, prompt: str, images: list[bytes], messages: list[dict] | None = None) -> dict:
        """The inputs of `prompt` after the images, or of a whole conversation (`messages`, whose
        {"type": "image"} parts take `images` in order)."""
        if messages is None:
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
            messages = [{"role": "user", "content": content}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs: dict = {}
        pics = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        if self.combined is not None:
            # RGB pictures are channels-last; left to guess, a 1x1 picture is taken as channels-first
            return dict(self.combined(images=pics or None, text=text, return_tensors="pt",
                                      input_data_format="channels_last"))
        if images:
            vision = self.processor(images=pics, return_tensors="pt", input_data_format="channels_last")
            merge = self.config.vision_config.spatial_merge_size
            # the Qwen-VL processors: each <|image_pad|> becomes one token per merged patch
            for grid in vision["image_grid_thw"]:
                n = int(grid.prod()) // merge**2
                text = text.replace("<|image_pad|>", "<|placeholder|>" * n, 1)
            text = text.replace("<|placeholder|>", "<|image_pad|>")
            inputs.update(vision)
        inputs.update(self.tokenizer(text, return_tensors="pt", add_special_tokens=False))
        return inputs

    def image_tokens(self, images: list[bytes]) -> int:
        """How many image tokens these images become in a prompt."""
        return int((self("", images)["input_ids"] == self.config.image_token_id).sum()) if images else 0


class HFModel:
    def __init__(self, path, dtype=torch.float32, device: str = "cpu") -> None:
        self.inputs = HFInputs(path)
        self.device = torch.device(device)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)  # the family's own class
        self.model = self.model.to(self.device).eval()

    def _inputs(self, prompt: str, images: list[bytes], messages: list[dict] | None = None) -> dict:
        return {k: v.to(self.device) for k, v in self.inputs(prompt, images, messages).items()}

    @torch.inference_mode()
    def generate(self, prompt: str, images: list[bytes], max_new_tokens: int,
                 messages: list[dict] | None = None) -> Generation:
        """Greedy; the clock starts before the inputs are built, as a server's does at arrival."""
        start = time.perf_counter()
        inputs = self._inputs(prompt, images, messages)
        clock = _Clock(start)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=clock)
        ids = out[0, inputs["input_ids"].shape[1]:].tolist()
        return Generation(ids, clock.times, time.perf_counter() - start)

    @torch.inference_mode()
    def prefill_logits(self, prompt: str, images: list[bytes]):
        return self.model(**self._inputs(prompt, images)).logits[0, -1].cpu().numpy()
