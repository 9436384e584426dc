"""Qwen3-VL and Qwen3-VL-MoE: Qwen2.5-VL's layout (t/h/w grids; patch 16, merge 2), transformers' own
vision tower (learned position embeddings interpolated per image, and the deepstack mergers), and our
decoder with Qwen3 attention (q/k RMSNorm, no qkv bias, explicit head_dim), interleaved M-RoPE and the
deepstack features added at the image positions after the first layers; MoE blocks for `qwen3_vl_moe`.

The deepstack features ride with the embeddings as `extra_features` column blocks.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from .layers import DecoderSpec, dense_mlp
from .moe import MoE
from .qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLTiny
from .rotary import RotarySpec
from .video import VideoConfig, VideoPlan, VideoRules, write_video_config


class Qwen3VLVideo(VideoRules):
    """transformers' `Qwen3VLVideoProcessor` and `Qwen3VLProcessor`: `fps` frames a second spread evenly
    over the whole video, one size for all frames within a budget for the whole clip, and each temporal
    patch in the prompt as `<T seconds>` then its own vision block (its M-RoPE positions those of an image)."""

    defaults = dict(min_pixels=128 * 32 * 32, max_pixels=32 * 32 * 768, patch_size=16, image_mean=(0.5,) * 3,
                    image_std=(0.5,) * 3)

    def sample(self, config: VideoConfig, info, fps: float | None) -> np.ndarray:
        total = info.frames
        count = config.num_frames if fps is None else None
        fps = fps if fps is not None else config.fps
        if count is None and fps is not None:
            count = min(min(max(int(total / info.fps * fps), config.min_frames), config.max_frames), total)
        if count is None:
            count = min(max(total, config.min_frames), config.max_frames)
        return np.linspace(0, total - 1, count).round().astype(np.int64)

    def size(self, frames: int, height: int, width: int) -> tuple[int, int]:
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        c = self.config
        return smart_resize(frames, height, width, temporal_factor=c.temporal_patch_size,
                            factor=c.patch_size * self.merge_size, min_pixels=c.min_pixels, max_pixels=c.max_pixels)

    def expand(self, plan: VideoPlan, tokens: int) -> str:
        indices = plan.indices.tolist()
        m = self.merge_size  # transformers averages timestamps by merge_size (= temporal_patch_size)
        indices += [indices[-1]] * (-len(indices) % m)
        stamps = [i / plan.source_fps for i in indices]
        seconds = [(stamps[i] + stamps[i + m - 1]) / 2 for i in range(0, len(stamps), m)]
        per_frame = tokens // plan.layout[0]
        return "".join(f"<{s:.1f} seconds><|vision_start|>{'<|video_pad|>' * per_frame}<|vision_end|>"
                       for s in seconds[:plan.layout[0]])

# Qwen3-VL-Instruct's chat format (no default system message), for the parts our requests use.
QWEN3_VL_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string %}{{ message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{ content['text'] }}{%- endif %}{%- endfor %}{%- endif %}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)

# (vision, text) shapes of the tiny checkpoints; deepstack after 3 vision blocks, as the real ones have.
SHAPES = {
    "tiny": (dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[1, 2, 3]),
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, mrope_section=[6, 5, 5], max_position_embeddings=4096)),
    "small": (dict(depth=6, hidden_size=256, intermediate_size=1024, num_heads=4, num_position_embeddings=256,
                   deepstack_visual_indexes=[1, 3, 5]),
              dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=64, mrope_section=[12, 10, 10], max_position_embeddings=32768)),
    "medium": (dict(depth=6, hidden_size=256, intermediate_size=1024, num_heads=4, num_position_embeddings=256,
                    deepstack_visual_indexes=[1, 3, 5]),
               dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                    num_key_value_heads=4, head_dim=128, mrope_section=[24, 20, 20], max_position_embeddings=32768)),
}
MOE = dict(num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)


def sparse_mlp(config, tp, layer: int) -> torch.nn.Module:
    """Qwen3-MoE's rule for which layers are MoE blocks: every `decoder_sparse_step`-th, except
    `mlp_only_layers`."""
    if layer not in (getattr(config, "mlp_only_layers", None) or []) and config.num_experts > 0 and \
            (layer + 1) % config.decoder_sparse_step == 0:
        return MoE(config, tp)
    return dense_mlp(config, tp, layer)


class Qwen3VLTiny(Qwen2_5_VLTiny):
    chat_template = QWEN3_VL_TEMPLATE
    moe = False  # the checkpoint's config

    @classmethod
    def write(cls, out: Path, size: str, seed: int, ids: dict[str, int], vocab_size: int) -> None:
        """Real config fields and parameter names (`model.visual.*`, `model.language_model.*`; the dense
        model ties its embeddings, as the 2B/4B checkpoints do), and a real-style slow processor config
        whose pixel budget is given only as `size`."""
        from .tiny_model import INIT_RANGE, generation_config, save_random

        vision, text = (dict(part) for part in SHAPES[size])
        mrope_section = text.pop("mrope_section")
        moe = cls.moe
        text.update(vocab_size=vocab_size, rope_theta=5000000.0, attention_bias=False, rms_norm_eps=1e-6,
                    initializer_range=INIT_RANGE,
                    rope_scaling={"rope_type": "default", "mrope_section": mrope_section, "mrope_interleaved": True},
                    tie_word_embeddings=not moe)
        if moe:
            text.update(MOE, moe_intermediate_size=text["intermediate_size"] // 2)
        config = cls._config_class()(
            text_config=text,
            vision_config=dict(out_hidden_size=text["hidden_size"], patch_size=16, spatial_merge_size=2,
                               temporal_patch_size=2, **vision),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=not moe, torch_dtype="float32",
        )
        save_random(cls._model_class(), config, out, seed, generation_config(ids))
        (out / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "patch_size": 16, "temporal_patch_size": 2,
            "merge_size": 2, "size": {"shortest_edge": 64 * 32 * 32 // 16, "longest_edge": 1024 * 32 * 32},
        }, indent=2) + "\n")
        # the video processor: 2 frames a second, the whole clip within 1024 merged patches
        write_video_config(out, "Qwen3VLVideoProcessor", patch_size=16, min_pixels=16 * 32 * 32,
                           max_pixels=1024 * 32 * 32, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)

    @staticmethod
    def _config_class():
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig

    @staticmethod
    def _model_class():
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration


class Qwen3VL(Qwen2_5_VL):
    model_type = "qwen3_vl"
    video_placeholder = "<|vision_start|><|video_pad|><|vision_end|>"
    tiny = Qwen3VLTiny
    # Qwen3 attention and interleaved M-RoPE (cos/sin come interleaved: the plain apply)
    decoder_spec = DecoderSpec(RotarySpec("qwen3_vl.modeling_qwen3_vl", "Qwen3VLTextRotaryEmbedding"),
                               qkv_bias=False, qk_norm=True)

    def __init__(self, model_path) -> None:
        super().__init__(model_path)
        text = self.config.text_config
        if getattr(text, "attention_bias", False):
            raise ValueError(f"{self.model_type} with attention_bias is not supported")
        self.extra_features = len(self.config.vision_config.deepstack_visual_indexes)

    def image_processor_kwargs(self) -> dict:
        """Real checkpoints give the pixel budget only as `size`, which the fast processor honours and the
        slow one (transformers 4.57) drops for its defaults: hand it over as min/max pixels."""
        config = json.loads((self.path / "preprocessor_config.json").read_text())
        size = config.get("size") or {}
        if "min_pixels" in config or "shortest_edge" not in size or "longest_edge" not in size:
            return {}
        return {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}

    def _video_rules(self) -> VideoRules:
        return Qwen3VLVideo(self.path, self.merge_size)

    def load_vision(self, device: str, dtype: torch.dtype) -> torch.nn.Module:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

        return self._vision(Qwen3VLVisionModel, device, dtype)

    @torch.inference_mode()
    def encode(self, vision: torch.nn.Module, pixel_values: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        """-> [sum tokens, H * (1 + deepstack layers)]: the embeddings, then each deepstack feature."""
        embeds, deepstack = vision(pixel_values.to(vision.dtype), grid_thw=self.frame_rows(layout))
        return torch.cat([embeds, *deepstack], dim=1)


class Qwen3VLMoeTiny(Qwen3VLTiny):
    moe = True

    @staticmethod
    def _config_class():
        from transformers import Qwen3VLMoeConfig

        return Qwen3VLMoeConfig

    @staticmethod
    def _model_class():
        from transformers import Qwen3VLMoeForConditionalGeneration

        return Qwen3VLMoeForConditionalGeneration


class Qwen3VLMoe(Qwen3VL):
    model_type = "qwen3_vl_moe"
    tiny = Qwen3VLMoeTiny
    decoder_spec = dataclasses.replace(Qwen3VL.decoder_spec, mlp=sparse_mlp)

    def load_vision(self, device: str, dtype: torch.dtype) -> torch.nn.Module:
        from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

        return self._vision(Qwen3VLMoeVisionModel, device, dtype)
