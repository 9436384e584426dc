"""Qwen2.5-VL: transformers' own vision tower, and our tensor-parallel decoder (HF names), each loaded with
only its weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig
from transformers.modeling_utils import no_init_weights
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from ..tp import TensorParallel
from ..weights import load_renamed
from .decoder import Decoder, shard_taker
from .mrope import mrope_positions

# Checkpoints come in two layouts: legacy (`visual.*`, `model.*`) and transformers>=4.52
# (`model.visual.*`, `model.language_model.*`).
_VISION_NAMES = {"visual.": "", "model.visual.": ""}
_TEXT_NAMES = {"model.": "model.", "model.visual.": None, "model.language_model.": "model.", "lm_head.": "lm_head."}


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

    def load_decoder(self, device: str, dtype: torch.dtype, tp: TensorParallel) -> Decoder:
        """This rank's shard of the language model; reads only its slices from the checkpoint."""
        with torch.device("meta"):
            model = Decoder(self.config.text_config, tp)
        state = load_renamed(self.path, _TEXT_NAMES, take=shard_taker(tp.rank, tp.size))
        if "lm_head.weight" not in state and getattr(self.config, "tie_word_embeddings", False):
            state["lm_head.weight"] = state["model.embed_tokens.weight"]  # e.g. Qwen2.5-VL-3B
        model.load_state_dict(state, strict=False, assign=True)
        model.model.rotary_emb = type(model.model.rotary_emb)(self.config.text_config)  # buffers, not weights
        missing = {n for n, _ in model.named_parameters()} - set(state)
        if missing:
            raise ValueError(f"checkpoint lacks {sorted(missing)[:5]}")
        return model.to(device=device, dtype=dtype).eval()

    def positions(self, input_ids: np.ndarray, grid_thw: np.ndarray) -> tuple[np.ndarray, int]:
        return mrope_positions(input_ids, grid_thw, self.image_token_id, self.merge_size)
