"""Qwen2.5-VL: transformers' own vision tower and text decoder, each loaded with only its weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig
from transformers.modeling_utils import no_init_weights
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLTextModel,
)

from ..weights import load_renamed
from .mrope import mrope_positions

# Checkpoints come in two layouts: legacy (`visual.*`, `model.*`) and transformers>=4.52
# (`model.visual.*`, `model.language_model.*`).
_VISION_NAMES = {"visual.": "", "model.visual.": ""}
_TEXT_NAMES = {"model.": "model.", "model.visual.": None, "model.language_model.": "model.", "lm_head.": "lm_head."}


class TextDecoder(torch.nn.Module):
    """The language half: HF's `Qwen2_5_VLTextModel` plus `lm_head`, HF parameter names."""

    def __init__(self, config) -> None:
        super().__init__()
        self.model = Qwen2_5_VLTextModel._from_config(config)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class Qwen2_5_VL:
    model_type = "qwen2_5_vl"

    def __init__(self, model_path: str | Path) -> None:
        self.path = Path(model_path)
        self.config = AutoConfig.from_pretrained(self.path)
        self.image_token_id: int = self.config.image_token_id
        self.merge_size: int = self.config.vision_config.spatial_merge_size
        self.hidden_size: int = self.config.text_config.hidden_size
        self.max_model_len: int = self.config.text_config.max_position_embeddings

    def tokens_per_image(self, grid_thw: np.ndarray) -> np.ndarray:
        """grid_thw: [N, 3] -> [N] placeholder tokens per image."""
        return np.prod(np.asarray(grid_thw).reshape(-1, 3), axis=1) // (self.merge_size**2)

    def load_vision(self, device: str, dtype: torch.dtype) -> torch.nn.Module:
        with no_init_weights():
            model = Qwen2_5_VisionTransformerPretrainedModel._from_config(self.config.vision_config)
        model.load_state_dict(load_renamed(self.path, _VISION_NAMES), strict=True)
        return model.to(device=device, dtype=dtype).eval()

    @torch.inference_mode()
    def encode(self, vision: torch.nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values: [P, C*T*14*14], grid_thw: [N, 3] -> embeddings [sum tokens_per_image, H]."""
        return vision(pixel_values.to(vision.dtype), grid_thw=grid_thw)

    def load_text(self, device: str, dtype: torch.dtype) -> TextDecoder:
        with no_init_weights():
            model = TextDecoder(self.config.text_config)
        model.load_state_dict(load_renamed(self.path, _TEXT_NAMES), strict=True)
        return model.to(device=device, dtype=dtype).eval()

    def positions(self, input_ids: np.ndarray, grid_thw: np.ndarray) -> tuple[np.ndarray, int]:
        return mrope_positions(input_ids, grid_thw, self.image_token_id, self.merge_size)
