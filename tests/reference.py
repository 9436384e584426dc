"""transformers' own answer, computed without any of triton-vlm's serving code: the yardstick for parity
tests (`triton_vlm_clients.hf_baseline` uses only transformers)."""

from __future__ import annotations

import numpy as np

from triton_vlm_clients.hf_baseline import HFModel

_MODELS: dict[tuple[str, str], HFModel] = {}


def _load(path, device: str = "cpu") -> HFModel:
    if (str(path), device) not in _MODELS:
        _MODELS[str(path), device] = HFModel(path, device=device)
    return _MODELS[str(path), device]


def reference_inputs(path, prompt: str, images: list[bytes]) -> dict:
    return _load(path).inputs(prompt, images)


def reference_generate(path, prompt: str, images: list[bytes], max_new_tokens: int,
                       messages: list[dict] | None = None, device: str = "cpu") -> list[int]:
    """Greedy ids (fp32, on `device`) for `prompt` after the images, or for a whole conversation (`messages`
    with {"type": "image"} parts, which take `images` in order)."""
    return _load(path, device).generate(prompt, images, max_new_tokens, messages).output_ids


def reference_prefill_logits(path, prompt: str, images: list[bytes]) -> np.ndarray:
    return _load(path).prefill_logits(prompt, images)
