"""GLM-4.1V and GLM-4.5V (`glm4v`, `glm4v_moe`): patch-grid families (`grid.py`: t/h/w grids; patch 14,
merge 2; 3D positions, GLM's `get_rope_index` places image tokens as Qwen's does), resized by GLM's own rule;
transformers' own vision tower (2D RoPE, learned position embeddings interpolated per image); and our
decoder with GLM's partial M-RoPE, its extra norms and fused gate/up (GLM-4.1V), or routed and shared
experts (GLM-4.5V). The chat format starts with `[gMASK]<sop>`; an image is
`<|begin_of_image|>` + `<|image|>` x tokens + `<|end_of_image|>`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .family import TinyCheckpoint
from .grid import PatchGridFamily
from .layers import DecoderSpec, dense_mlp
from .moe import SharedMoE
from .rotary import RotarySpec
from .video import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VideoConfig, VideoPlan, VideoRules, write_video_config


class Glm4vVideo(VideoRules):
    """transformers' `Glm4vVideoProcessor` and `Glm4vProcessor`: `fps` frames a second (frame k at
    ceil(k * source_fps / fps)), an even count, one size for the clip within a budget for all its frames;
    in the prompt each temporal patch is an image block (`<|image|>` tokens) and then its whole second, and
    its M-RoPE positions are an image's. Its sampler has no frame cap: the server's limit refuses more."""

    defaults = dict(min_pixels=112 * 112, max_pixels=28 * 28 * 2 * 30000, patch_size=14)
    max_duration = 300

    def sample(self, config: VideoConfig, info, fps: float | None) -> np.ndarray:
        total, fps = info.frames, fps if fps is not None else config.fps or 2
        last = total - 1
        duration = info.duration or round(last / info.fps) + 1
        if duration <= self.max_duration:
            indices = [min(last, int(math.ceil(i * info.fps / fps))) for i in range(int(math.floor(duration * fps)))]
        else:
            count = int(self.max_duration * fps)
            indices = list(range(total)) if count >= total else [
                min(last, int(math.ceil(t * info.fps))) for t in np.linspace(0, duration, count, endpoint=True)]
        unique = list(dict.fromkeys(indices))
        if len(unique) & 1:
            unique.append(unique[-1])
        return np.asarray(unique, np.int64)

    def size(self, frames: int, height: int, width: int) -> tuple[int, int]:
        from transformers.models.glm4v.image_processing_glm4v import smart_resize

        c = self.config
        return smart_resize(num_frames=frames, height=height, width=width, temporal_factor=c.temporal_patch_size,
                            factor=c.patch_size * self.merge_size, min_pixels=c.min_pixels, max_pixels=c.max_pixels)

    def expand(self, plan: VideoPlan, tokens: int) -> str:
        t = plan.layout[0]
        stamps = [i / plan.source_fps for i in plan.indices.tolist()][::2][:t]
        stamps += [stamps[-1] if stamps else 0] * (t - len(stamps))
        per_frame = tokens // t
        return "".join(f"<|begin_of_image|>{'<|image|>' * per_frame}<|end_of_image|>{int(s)}" for s in stamps)


# GLM-4.1V's chat format, for the parts our requests use.
GLM4V_TEMPLATE = (
    "[gMASK]<sop>{%- for msg in messages %}{%- if msg.role == 'system' %}<|system|>\n{{ msg.content }}"
    "{%- elif msg.role == 'user' %}<|user|>{{ '\\n' }}{%- if msg.content is string %}{{ msg.content }}"
    "{%- else %}{%- for item in msg.content %}"
    "{%- if item.type == 'video' or 'video' in item %}<|begin_of_video|><|video|><|end_of_video|>"
    "{%- elif item.type == 'image' or 'image' in item %}<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif item.type == 'text' %}{{ item.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- elif msg.role == 'assistant' %}<|assistant|>\n{{ msg.content }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# (vision, text) shapes of the tiny checkpoints; head_dim 32 with half of it rotated, in sections 2/3/3.
SHAPES = {
    "tiny": (dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2),
             dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096), [2, 3, 3]),
    "small": (dict(depth=6, hidden_size=256, intermediate_size=1024, num_heads=4),
              dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=32768), [4, 6, 6]),
    "medium": (dict(depth=6, hidden_size=256, intermediate_size=1024, num_heads=4),
               dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=4, max_position_embeddings=32768), [8, 12, 12]),
}
# GLM-4.5V's MoE settings, scaled down: the first layer dense, then routed experts and one shared one.
MOE = dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
           topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0)


class Glm4vTiny(TinyCheckpoint):
    chat_template = GLM4V_TEMPLATE
    special_tokens = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                      "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                      "<|begin_of_video|>", "<|end_of_video|>", "<|image|>", "<|video|>", "<think>", "</think>")
    eos_token, pad_token = "<|endoftext|>", "<|endoftext|>"
    moe = False  # the checkpoint's config

    @classmethod
    def write(cls, out: Path, size: str, seed: int, ids: dict[str, int], vocab_size: int) -> None:
        """Real config fields and parameter names (`model.visual.*`, `model.language_model.*`), GLM's
        end-of-turn tokens, and a real-style slow processor config (pixel budget as `size`)."""
        import transformers

        from .tiny_model import INIT_RANGE, generation_config, save_random

        vision, text, section = (dict(SHAPES[size][0]), dict(SHAPES[size][1]), SHAPES[size][2])
        text.update(vocab_size=vocab_size, rope_theta=10000.0, partial_rotary_factor=0.5, rms_norm_eps=1e-5,
                    initializer_range=INIT_RANGE, rope_scaling={"rope_type": "default", "mrope_section": section},
                    tie_word_embeddings=False, image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"])
        moe = cls.moe
        if moe:
            text.update(MOE, moe_intermediate_size=text["intermediate_size"] // 4, attention_bias=True,
                        head_dim=text["hidden_size"] // text["num_attention_heads"])
        name = "Glm4vMoe" if moe else "Glm4v"
        config = getattr(transformers, f"{name}Config")(
            text_config=text,
            vision_config=dict(out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                               temporal_patch_size=2, image_size=336, initializer_range=INIT_RANGE, **vision),
            image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
            image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
            video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"],
            tie_word_embeddings=False, torch_dtype="float32")
        save_random(getattr(transformers, f"{name}ForConditionalGeneration"), config, out, seed,
                    generation_config(ids, eos=("<|endoftext|>", "<|user|>", "<|observation|>")))
        (out / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "Glm4vImageProcessor", "processor_class": "Glm4vProcessor", "do_resize": True,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "resample": 3, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "patch_size": 14, "temporal_patch_size": 2,
            "merge_size": 2, "size": {"shortest_edge": 112 * 112, "longest_edge": 2 * 1024 * 28 * 28},
        }, indent=2) + "\n")
        # the video processor: 2 frames a second, the whole clip within 1024 merged patches
        write_video_config(out, "Glm4vVideoProcessor", patch_size=14, min_pixels=112 * 112,
                           max_pixels=1024 * 28 * 28, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)


class Glm4v(PatchGridFamily):
    model_type = "glm4v"
    image_placeholder = "<|image|>"
    video_placeholder = "<|video|>"  # it becomes image blocks: a video's tokens are `<|image|>` tokens
    tiny = Glm4vTiny
    # GLM's partial M-RoPE; MLPs hold gate and up as one gate_up_proj; norms after attention and MLP too
    decoder_spec = DecoderSpec(RotarySpec("glm4v.modeling_glm4v", "Glm4vTextRotaryEmbedding",
                                          "apply_multimodal_rotary_pos_emb"), qkv_bias=True,
                               mlp=functools.partial(dense_mlp, fused=True), sandwich_norm=True)

    def layout_from_sizes(self, processor, sizes: Sequence[tuple[int, int]]) -> np.ndarray:
        from transformers.models.glm4v.image_processing_glm4v import smart_resize

        p, rows = processor, []
        for width, height in sizes:
            h, w = smart_resize(p.temporal_patch_size, height, width, temporal_factor=p.temporal_patch_size,
                                factor=p.patch_size * p.merge_size, min_pixels=p.size["shortest_edge"],
                                max_pixels=p.size["longest_edge"])
            rows.append((1, h // p.patch_size, w // p.patch_size))
        return np.asarray(rows, np.int64).reshape(-1, 3)

    def __init__(self, model_path) -> None:
        super().__init__(model_path)
        self.video_token_id = self.image_token_id  # every row, image or temporal patch, is positioned as an image

    def _video_rules(self) -> VideoRules:
        return Glm4vVideo(self.path, self.merge_size)

    def load_vision(self, device: str, dtype: torch.dtype) -> torch.nn.Module:
        from transformers.models.glm4v.modeling_glm4v import Glm4vVisionModel

        return self._vision(Glm4vVisionModel, device, dtype)


def shared_moe_mlp(config, tp, layer: int) -> torch.nn.Module:
    """GLM-4.5V's layers after the first `first_k_dense_replace` are MoE blocks with transformers' own router
    (sigmoid scores with a correction bias, the best groups, then the top k, renormalized and scaled)."""
    if layer < config.first_k_dense_replace:
        return dense_mlp(config, tp, layer)
    from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeTextTopkRouter

    return SharedMoE(config, tp, Glm4vMoeTextTopkRouter(config))


class Glm4vMoeTiny(Glm4vTiny):
    moe = True


class Glm4vMoe(Glm4v):
    model_type = "glm4v_moe"
    tiny = Glm4vMoeTiny
    decoder_spec = DecoderSpec(RotarySpec("glm4v_moe.modeling_glm4v_moe", "Glm4vMoeTextRotaryEmbedding",
                                          "apply_multimodal_rotary_pos_emb"), qkv_bias=True, mlp=shared_moe_mlp)

    def __init__(self, model_path) -> None:
        super().__init__(model_path)
        if getattr(self.text_config, "use_qk_norm", False):
            raise ValueError("glm4v_moe with use_qk_norm is not supported")
        self.decoder_spec = dataclasses.replace(self.decoder_spec, qkv_bias=self.text_config.attention_bias)

    def load_vision(self, device: str, dtype: torch.dtype) -> torch.nn.Module:
        from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeVisionModel

        return self._vision(Glm4vMoeVisionModel, device, dtype)
