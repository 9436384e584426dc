"""InternVL (the transformers-native "-hf" checkpoints): images cut into tiles by `GotOcr2ImageProcessor`'s
`crop_to_patches` rule (a grid of tiles chosen by aspect ratio, plus a thumbnail), each tile a fixed
number of tokens after transformers' own vision tower, pixel shuffle and projector; a Qwen2 (or Qwen3)
language model with plain 1D RoPE.

An image's layout row is (tiles, columns, rows) of its grid. Tiles encode independently, so they are
the pieces of encoder data parallelism: one image may be spread over several replicas.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig
from transformers.modeling_utils import no_init_weights
from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas
from transformers.models.internvl.modeling_internvl import (
    InternVLModel,
    InternVLMultiModalProjector,
    InternVLVisionModel,
)

from .decoder import load_decoder
from .family import Family, TinyCheckpoint
from .layers import DecoderSpec
from .rotary import RotarySpec
from .tp import TensorParallel
from .weights import load_renamed

# The -hf checkpoints' chat format (as transformers' conversion script writes it): each image is marked
# with the image-context token, which the processor expands.
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)

# Checkpoints come as transformers>=4.52 saves them, or in the earlier layout.
VISION_NAMES = {"model.vision_tower.": "vision_tower.", "model.multi_modal_projector.": "multi_modal_projector.",
                "vision_tower.": "vision_tower.", "multi_modal_projector.": "multi_modal_projector."}
TEXT_NAMES = {"model.language_model.": "model.", "lm_head.": "lm_head.",
              "language_model.model.": "model.", "language_model.lm_head.": "lm_head."}
LANGUAGE_MODELS = {  # text_config.model_type -> our decoder (not yet Qwen3-MoE, whose experts are not fused)
    "qwen2": DecoderSpec(RotarySpec("qwen2.modeling_qwen2", "Qwen2RotaryEmbedding", one_d=True), qkv_bias=True),
    "qwen3": DecoderSpec(RotarySpec("qwen2.modeling_qwen2", "Qwen2RotaryEmbedding", one_d=True), qkv_bias=False,
                         qk_norm=True),
}

# (vision, text, tile side) of the tiny checkpoints. `tiny` cuts 112-pixel tiles (16 tokens each) so that
# tests stay cheap; `small` has the real 448 (256 tokens each).
SHAPES = {
    "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096), 112),
    "small": (dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4),
              dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=2, max_position_embeddings=32768), 448),
    "medium": (dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4),
               dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                    num_key_value_heads=4, max_position_embeddings=32768), 448),
}


class _Vision(nn.Module):
    """The vision tower and the projector, named as in the checkpoint; transformers' own feature code
    (CLS dropped, pixel shuffle, projector)."""

    get_image_features = InternVLModel.get_image_features
    pixel_shuffle = InternVLModel.pixel_shuffle

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = InternVLVisionModel._from_config(config.vision_config)
        self.multi_modal_projector = InternVLMultiModalProjector(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.multi_modal_projector.linear_1.weight.dtype


class InternVLTiny(TinyCheckpoint):
    chat_template = INTERNVL_TEMPLATE
    special_tokens = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>")
    eos_token, pad_token = "<|im_end|>", "<|endoftext|>"
    tokenizer_extras = {"extra_special_tokens": {"start_image_token": "<img>", "end_image_token": "</img>",
                                                 "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}}

    @classmethod
    def write(cls, out: Path, size: str, seed: int, ids: dict[str, int], vocab_size: int) -> None:
        """Real config fields and parameter names, a Qwen2 language model, and a real-style slow processor
        config (tiling off in it, as in the real ones: the combined processor turns it on)."""
        import json

        from transformers import InternVLConfig, InternVLForConditionalGeneration

        from .tiny_model import INIT_RANGE, generation_config, save_random

        vision, text, side = (dict(SHAPES[size][0]), dict(SHAPES[size][1]), SHAPES[size][2])
        text.update(model_type="qwen2", vocab_size=vocab_size, rope_theta=1000000.0, rms_norm_eps=1e-6,
                    initializer_range=INIT_RANGE, tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"],
                    eos_token_id=ids["<|im_end|>"])
        tile_tokens = (side // 14) ** 2 // 4
        config = InternVLConfig(
            vision_config=dict(image_size=[side, side], patch_size=[14, 14], initializer_range=INIT_RANGE, **vision),
            text_config=text, image_token_id=ids["<IMG_CONTEXT>"], image_seq_length=tile_tokens,
            downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
            vision_feature_select_strategy="default", tie_word_embeddings=False, torch_dtype="float32")
        save_random(InternVLForConditionalGeneration, config, out, seed, generation_config(ids))
        (out / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "GotOcr2ImageProcessorFast", "crop_to_patches": False, "min_patches": 1,
            "max_patches": 12, "do_resize": True, "size": {"height": side, "width": side}, "resample": 3,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
            "processor_class": "InternVLProcessor"}, indent=2) + "\n")
        (out / "processor_config.json").write_text(json.dumps(
            {"image_seq_length": tile_tokens, "processor_class": "InternVLProcessor"}, indent=2) + "\n")


class InternVL(Family):
    model_type = "internvl"
    image_placeholder = "<IMG_CONTEXT>"
    tiny = InternVLTiny

    def __init__(self, model_path: str | Path) -> None:
        super().__init__(model_path)
        self.config = config = AutoConfig.from_pretrained(self.path)
        if config.vision_feature_layer != -1:
            raise ValueError(f"internvl with vision_feature_layer={config.vision_feature_layer} is not supported")
        if config.text_config.model_type not in LANGUAGE_MODELS:
            raise ValueError(f"internvl with a {config.text_config.model_type} language model is not supported; "
                             f"supported: {', '.join(LANGUAGE_MODELS)}")
        self.decoder_spec = LANGUAGE_MODELS[config.text_config.model_type]
        self.image_token_id: int = config.image_token_id
        self.hidden_size: int = config.text_config.hidden_size
        self.max_model_len: int = config.text_config.max_position_embeddings
        vision = config.vision_config
        side = (vision.image_size[0] // vision.patch_size[0]) * config.downsample_ratio
        self.tile_tokens = int(side * side)  # tokens of a tile after pixel shuffle

    @property
    def text_config(self):
        return self.config.text_config

    # --- layout: (tiles, columns, rows) ---------------------------------------
    def tokens_per_image(self, layout: np.ndarray) -> np.ndarray:
        return self.pixel_rows(layout) * self.tile_tokens

    def pixel_rows(self, layout: np.ndarray) -> np.ndarray:
        return np.asarray(layout, np.int64).reshape(-1, 3)[:, 0]

    def pieces(self, layout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tiles = self.pixel_rows(layout)
        return np.ones((int(tiles.sum()), 3), np.int64), np.repeat(np.arange(len(tiles)), tiles)

    def image_processor_kwargs(self) -> dict:
        """transformers' combined InternVL processor tiles images whatever the image processor's config
        says (real configs say `crop_to_patches: false`); so do we."""
        return {"crop_to_patches": True}

    def layout_from_sizes(self, processor, sizes: Sequence[tuple[int, int]]) -> np.ndarray:
        """`GotOcr2ImageProcessor.crop_image_to_patches`'s grid: the tiled canvas closest to the aspect ratio,
        and a thumbnail when there is more than one tile."""
        rows = []
        tile = (processor.size["height"], processor.size["width"])
        for width, height in sizes:
            columns, grid_rows = 1, 1
            if processor.crop_to_patches and processor.max_patches > 1:
                columns, grid_rows = get_optimal_tiled_canvas((height, width), tile, processor.min_patches,
                                                              processor.max_patches)
            tiles = columns * grid_rows
            rows.append((tiles + 1 if tiles > 1 else 1, columns, grid_rows))
        return np.asarray(rows, np.int64).reshape(-1, 3)

    def pixel_dim(self, processor) -> int:
        return 3 * processor.size["height"] * processor.size["width"]

    def process(self, processor, pictures) -> tuple[np.ndarray, np.ndarray]:
        out = processor(images=pictures, return_tensors="np", input_data_format="channels_last")
        layout = self.layout_from_sizes(processor, [picture.size for picture in pictures])
        if not np.array_equal(out["num_patches"], layout[:, 0]):
            raise RuntimeError(f"tiles from sizes {layout[:, 0].tolist()} != processed {out['num_patches'].tolist()}")
        pixels = out["pixel_values"].astype(np.float32)
        return pixels.reshape(len(pixels), -1), layout

    # --- prompt ---------------------------------------------------------------
    def expand_placeholder(self, tokens: int) -> str:
        return "<img>" + self.image_placeholder * tokens + "</img>"

    def positions(self, input_ids: np.ndarray, layout: np.ndarray, video_fps: float = 0.0) -> tuple[np.ndarray, int]:
        return np.broadcast_to(np.arange(len(input_ids), dtype=np.int64), (3, len(input_ids))).copy(), 0

    # --- models ---------------------------------------------------------------
    def load_vision(self, device: str, dtype: torch.dtype) -> torch.nn.Module:
        with no_init_weights():
            model = _Vision(self.config)
        model.load_state_dict(load_renamed(self.path, VISION_NAMES), strict=True)
        return model.to(device=device, dtype=dtype).eval()

    @torch.inference_mode()
    def encode(self, vision: torch.nn.Module, pixel_values: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        """pixel_values: [tiles, 3 * side * side] -> [tiles * tile_tokens, H]."""
        side = self.config.vision_config.image_size
        tiles = pixel_values.to(vision.dtype).reshape(-1, 3, side[0], side[1])
        return vision.get_image_features(tiles).reshape(-1, self.hidden_size)

    def load_decoder(self, device: str, dtype: torch.dtype, tp: TensorParallel):
        return load_decoder(self.text_config, self.decoder_spec,
                            lambda take: load_renamed(self.path, TEXT_NAMES, take=take), device, dtype, tp,
                            getattr(self.text_config, "tie_word_embeddings", False))
