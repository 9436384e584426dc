"""transformers' own answer, computed without any triton-vlm code: the yardstick for parity tests."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

_MODELS: dict[str, tuple] = {}


def _load(path):
    key = str(path)
    if key not in _MODELS:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        _MODELS[key] = (model, AutoTokenizer.from_pretrained(path),
                        AutoImageProcessor.from_pretrained(path, use_fast=False))
    return _MODELS[key]


def reference_inputs(path, prompt: str, images: list[bytes]) -> dict:
    model, tokenizer, processor = _load(path)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    inputs: dict = {}
    if images:
        pics = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        vision = processor(images=pics, return_tensors="pt")
        merge = model.config.vision_config.spatial_merge_size
        # Qwen2.5-VL's processor: each <|image_pad|> becomes one token per merged patch
        for grid in vision["image_grid_thw"]:
            n = int(grid.prod()) // merge**2
            text = text.replace("<|image_pad|>", "<|placeholder|>" * n, 1)
        text = text.replace("<|placeholder|>", "<|image_pad|>")
        inputs.update(vision)
    inputs.update(tokenizer(text, return_tensors="pt", add_special_tokens=False))
    return inputs


def reference_generate(path, prompt: str, images: list[bytes], max_new_tokens: int) -> list[int]:
    model = _load(path)[0]
    inputs = reference_inputs(path, prompt, images)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def reference_prefill_logits(path, prompt: str, images: list[bytes]) -> np.ndarray:
    model = _load(path)[0]
    with torch.inference_mode():
        return model(**reference_inputs(path, prompt, images)).logits[0, -1].numpy()
