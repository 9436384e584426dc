"""Qwen2.5-VL: a patch-grid family (`grid.py`) resized by Qwen's `smart_resize`; transformers' own vision
tower (windowed attention) and our tensor-parallel decoder, each loaded with only its weights."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .family import TinyCheckpoint
from .grid import PatchGridFamily
from .layers import DecoderSpec
from .rotary import RotarySpec
from .tiny_model import QWEN2_VL_TEMPLATE
from .video import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VideoConfig,
    VideoPlan,
    VideoRules,
    uniform_indices,
    write_video_config,
)


class Qwen2VLVideo(VideoRules):
    """transformers' `Qwen2VLVideoProcessor` (Qwen2.5-VL's) and `Qwen2_5_VLProcessor`: frames sampled
    uniformly at `fps` (or `num_frames`), each frame resized within the pixel budget, a video's tokens
    one run of `<|video_pad|>`, its temporal patches `temporal_patch_size / fps` seconds apart on the
    M-RoPE time axis. Unlike transformers (whose `do_sample_frames` is off by default) frames are always
    sampled: a server cannot take every frame of a long video."""

    defaults = dict(min_pixels=128 * 28 * 28, max_pixels=28 * 28 * 768, patch_size=14)

    def __init__(self, path, merge_size: int, tokens_per_second: float) -> None:
        super().__init__(path, merge_size)
        self.tokens_per_second = tokens_per_second

    def sample(self, config: VideoConfig, info, fps: float | None) -> np.ndarray:
        tp, total = config.temporal_patch_size, info.frames
        if fps is None and config.num_frames is not None:
            count = round(config.num_frames / tp) * tp
        else:
            fps = fps if fps is not None else config.fps or 2.0
            most = math.floor(min(config.max_frames, total) / tp) * tp
            count = min(min(max(total / info.fps * fps, config.min_frames), most), total)
            count = math.floor(count / tp) * tp
        if count > total or count <= 0:
            raise ValueError(f"it has {total} frames; sampling needs at least {tp}")
        return uniform_indices(total, count)

    def size(self, frames: int, height: int, width: int) -> tuple[int, int]:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        c = self.config
        return smart_resize(height, width, factor=c.patch_size * self.merge_size, min_pixels=c.min_pixels,
                            max_pixels=c.max_pixels)

    def expand(self, plan: VideoPlan, tokens: int) -> str:
        return "<|video_pad|>" * tokens

    def time_positions(self, temporal_patches: int, fps: float) -> np.ndarray:
        """`get_rope_index`: `arange(t) * second_per_grid_t * tokens_per_second`, where transformers 4.57 casts
        `second_per_grid_t` to the integer dtype of `arange` first (so above 2 fps it is 0), as copied here."""
        seconds_per_patch = int(self.config.temporal_patch_size / fps)
        return np.arange(temporal_patches, dtype=np.int64) * seconds_per_patch * int(self.tokens_per_second)


class Qwen2_5_VLTiny(TinyCheckpoint):
    chat_template = QWEN2_VL_TEMPLATE
    special_tokens = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                      "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
    eos_token, pad_token = "<|im_end|>", "<|endoftext|>"

    @classmethod
    def write(cls, out: Path, size: str, seed: int, ids: dict[str, int], vocab_size: int) -> None:
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
        # the video processor samples 2 frames a second; each frame within the real processor's pixel budget
        # (tiny: at most 256 patches)
        budget = (56 * 56, 256 * 14 * 14) if size == "tiny" else (128 * 28 * 28, 768 * 28 * 28)
        write_video_config(out, "Qwen2VLVideoProcessor", patch_size=14, min_pixels=budget[0], max_pixels=budget[1],
                           image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)


class Qwen2_5_VL(PatchGridFamily):
    model_type = "qwen2_5_vl"
    image_placeholder = "<|image_pad|>"
    video_placeholder = "<|video_pad|>"
    tiny = Qwen2_5_VLTiny
    decoder_spec = DecoderSpec(RotarySpec("qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLRotaryEmbedding",
                                          "apply_multimodal_rotary_pos_emb"), qkv_bias=True)

    def layout_from_sizes(self, processor, sizes: Sequence[tuple[int, int]]) -> np.ndarray:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        p, rows = processor, []
        for width, height in sizes:
            h, w = smart_resize(height, width, factor=p.patch_size * p.merge_size, min_pixels=p.min_pixels,
                                max_pixels=p.max_pixels)
            rows.append((1, h // p.patch_size, w // p.patch_size))
        return np.asarray(rows, np.int64).reshape(-1, 3)

    def _video_rules(self) -> VideoRules:
        return Qwen2VLVideo(self.path, self.merge_size, self.config.vision_config.tokens_per_second)

    def load_vision(self, device: str, dtype: torch.dtype) -> torch.nn.Module:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        return self._vision(Qwen2_5_VisionTransformerPretrainedModel, device, dtype)
