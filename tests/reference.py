"""transformers' own answer, computed without any of triton-vlm's serving code: the yardstick for parity
tests (`triton_vlm_clients.hf_baseline` uses only transformers)."""

from __future__ import annotations

import numpy as np

from triton_vlm_clients.hf_baseline import HFModel

_MODELS: dict[str, HFModel] = {}


def _load(path) -> HFModel:
    if str(path) not in _MODELS:
        _MODELS[str(path)] = HFModel(path)
    return _MODELS[str(path)]


def reference_inputs(path, prompt: str, images: list[bytes]) -> dict:
    return _load(path).inputs(prompt, images)


def reference_generate(path, prompt: str, images: list[bytes], max_new_tokens: int,
                       messages: list[dict] | None = None) -> list[int]:
    """Greedy ids for `prompt` after the images, or for a whole conversation (`messages` with
    {"type": "image"} parts, which take `images` in order)."""
    return _load(path).generate(prompt, images, max_new_tokens, messages).output_ids


def reference_prefill_logits(path, prompt: str, images: list[bytes]) -> np.ndarray:
    return _load(path).prefill_logits(prompt, images)
