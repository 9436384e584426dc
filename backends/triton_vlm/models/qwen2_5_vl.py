"""Qwen2.5-VL: transformers' own vision tower, and our tensor-parallel decoder (HF names), each loaded with
only its weights. Images are t/h/w patch grids, resized by Qwen's `smart_resize`; M-RoPE positions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig
from transformers.modeling_utils import no_init_weights

from .decoder import load_decoder
from .family import Family
from .layers import DecoderSpec
from .mrope import mrope_positions
from .rotary import RotarySpec
from .tiny_model import QWEN2_VL_TEMPLATE
from .tp import TensorParallel
from .weights import load_renamed

# Checkpoints come in two layouts: legacy (`visual.*`, `model.*`) and transformers>=4.52
# (`model.visual.*`, `model.language_model.*`).
VISION_NAMES = {"visual.": "", "model.visual.": ""}
TEXT_NAMES = {"model.": "model.", "model.visual.": None, "model.language_model.": "model.", "lm_head.": "lm_head."}


class Qwen2_5_VL(Family):
    model_type = "qwen2_5_vl"
    image_placeholder = "<|image_pad|>"
    chat_template = QWEN2_VL_TEMPLATE
    special_tokens = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                      "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
    eos_token, pad_token = "<|im_end|>", "<|endoftext|>"
    decoder_spec = DecoderSpec(RotarySpec("qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLRotaryEmbedding",
                                          "apply_multimodal_rotary_pos_emb"), qkv_bias=True)

    def __init__(self, model_path: str | Path) -> None:
        super().__init__(model_path)
        self.config = AutoConfig.from_pretrained(self.path)
        self.image_token_id: int = self.config.image_token_id
        self.merge_size: int = self.config.vision_config.spatial_merge_size
        self.hidden_size: int = self.config.text_config.hidden_size
        self.max_model_len: int = self.config.text_config.max_position_embeddings

    @property
    def text_config(self):
        return self.config.text_config

    def tokens_per_image(self, layout: np.ndarray) -> np.ndarray:
        return self.pixel_rows(layout) // (self.merge_size**2)

    def pixel_rows(self, layout: np.ndarray) -> np.ndarray:
        return np.prod(np.asarray(layout, np.int64).reshape(-1, 3), axis=1)

    def layout_from_sizes(self, processor, sizes: Sequence[tuple[int, int]]) -> np.ndarray:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        p, rows = processor, []
        for width, height in sizes:
            h, w = smart_resize(height, width, factor=p.patch_size * p.merge_size, min_pixels=p.min_pixels,
                                max_pixels=p.max_pixels)
            rows.append((1, h // p.patch_size, w // p.patch_size))
        return np.asarray(rows, np.int64).reshape(-1, 3)

    def pixel_dim(self, processor) -> int:
        return 3 * processor.temporal_patch_size * processor.patch_size**2

    def process(self, processor, pictures) -> tuple[np.ndarray, np.ndarray]:
        # RGB pictures are channels-last; left to guess, the processor takes a height of 1 or 3 for the
        # channels (a 1x1 image failed with "mean must have 1 elements", a 100x3 one got a transposed grid)
        out = processor(images=pictures, return_tensors="np", input_data_format="channels_last")
        return out["pixel_values"].astype(np.float32), out["image_grid_thw"].astype(np.int64)

    def expand_placeholder(self, tokens: int) -> str:
        return self.image_placeholder * tokens

    def positions(self, input_ids: np.ndarray, layout: np.ndarray) -> tuple[np.ndarray, int]:
        return mrope_positions(input_ids, layout, self.image_token_id, self.merge_size)

    def load_vision(self, device: str, dtype: torch.dtype) -> torch.nn.Module:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        return self._vision(Qwen2_5_VisionTransformerPretrainedModel, device, dtype)

    def _vision(self, cls, device: str, dtype: torch.dtype) -> torch.nn.Module:
        with no_init_weights():
            model = cls._from_config(self.config.vision_config)
        model.load_state_dict(load_renamed(self.path, VISION_NAMES), strict=True)
        return model.to(device=device, dtype=dtype).eval()

    @torch.inference_mode()
    def encode(self, vision: torch.nn.Module, pixel_values: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        """pixel_values: [P, C*T*14*14], layout (grid_thw): [N, 3] -> embeddings [sum tokens_per_image, H]."""
        return vision(pixel_values.to(vision.dtype), grid_thw=layout)

    @staticmethod
    def write_tiny(out: Path, size: str, seed: int, ids: dict[str, int], vocab_size: int) -> None:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        from .tiny_model import SIZES, generation_config

        text = dict(SIZES[size]["text"])
        mrope_section = text.pop("mrope_section")
        config = Qwen2_5_VLConfig(
            text_config=dict(vocab_size=vocab_size, rope_theta=1000000.0, tie_word_embeddings=False,
                             rope_scaling={"type": "mrope", "mrope_section": mrope_section}, **text),
            vision_config=dict(out_hidden_size=text["hidden_size"], window_size=112, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2,
                               **SIZES[size]["vision"]),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=False, torch_dtype="float32",
        )
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
        model.generation_config = generation_config(ids)
        model.save_pretrained(out, safe_serialization=True)
        # A 1280x720 image becomes ~1200 tokens; cap pixels so one image stays cheap on a CPU.
        Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=1280 * 28 * 28).save_pretrained(out)

    def load_decoder(self, device: str, dtype: torch.dtype, tp: TensorParallel):
        return load_decoder(self.text_config, self.decoder_spec,
                            lambda take: load_renamed(self.path, TEXT_NAMES, take=take), device, dtype, tp,
                            getattr(self.config, "tie_word_embeddings", False))  # e.g. Qwen2.5-VL-3B ties
