"""The shared layers our decoders are built from (tensor-parallel, over a paged KV cache).

- `Rotary` / `rotate`: 1D RoPE, M-RoPE (Qwen2-VL sections), interleaved M-RoPE (Qwen3-VL) or GLM-4.1V's
  and GLM-4.5V's partial M-RoPE, each with transformers' own frequency and application code; `positions`
  are always [3, b, s] (1D RoPE reads the first row).
- `Attention`: column-parallel q/k/v (by heads) with optional bias and optional q/k RMSNorm, an explicit
  `head_dim`, row-parallel o_proj and one all-reduce; the step's batch (`paged_attention.py`) stores
  keys and values in the paged cache and attends.
- `MLP` (dense, gate/up column- and down row-parallel; or GLM-4.1V's fused gate_up_proj), `MoE` (Qwen3:
  softmax top-k over fused experts) and `SharedMoE` (GLM-4.5V: transformers' own grouped sigmoid router,
  routed experts plus a shared one); each expert's intermediate dimension is split over the ranks, so
  every rank holds a slice of every expert.
- `Layer`: pre-norm residual blocks, with GLM-4.1V's extra norms after attention and MLP when asked.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm as RMSNorm

from .tp import TensorParallel


@dataclass(frozen=True)
class DecoderSpec:
    """What differs between the decoders of our families (the config gives the sizes)."""

    rotary: str = "mrope"  # a key of ROTARY
    qkv_bias: bool = True
    qk_norm: bool = False
    moe: str = ""  # sparse blocks where the config puts them: "qwen3" (MoE) | "glm4" (SharedMoE) | "" (dense)
    fused_gate_up: bool = False  # dense MLPs hold gate and up as one gate_up_proj (GLM-4.1V)
    sandwich_norm: bool = False  # norms after attention and after the MLP too (GLM-4.1V)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# kind -> (transformers module, its rotary embedding class, its function applying it with M-RoPE sections
# or None: the plain `apply_rotary_pos_emb`, for 1D and for interleaved M-RoPE whose cos/sin come
# interleaved already)
ROTARY = {
    "1d": ("qwen2.modeling_qwen2", "Qwen2RotaryEmbedding", None),
    "mrope": ("qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLRotaryEmbedding", "apply_multimodal_rotary_pos_emb"),
    "mrope_interleaved": ("qwen3_vl.modeling_qwen3_vl", "Qwen3VLTextRotaryEmbedding", None),
    "glm4v": ("glm4v.modeling_glm4v", "Glm4vTextRotaryEmbedding", "apply_multimodal_rotary_pos_emb"),
    "glm4v_moe": ("glm4v_moe.modeling_glm4v_moe", "Glm4vMoeTextRotaryEmbedding", "apply_multimodal_rotary_pos_emb"),
}


def _rotary(kind: str):
    """(the rotary embedding class, its sectioned apply function or None) of `kind`."""
    if kind not in ROTARY:
        raise ValueError(f"unknown rotary embedding {kind!r}")
    module, embedding, apply = ROTARY[kind]
    found = importlib.import_module(f"transformers.models.{module}")
    return getattr(found, embedding), getattr(found, apply) if apply else None


class Rotary(nn.Module):
    """(cos, sin) of the positions, computed once a step for every layer."""

    def __init__(self, config, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.embedding = _rotary(kind)[0](config)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, b, s] -> (cos, sin) for `rotate`."""
        return self.embedding(x, positions[0] if self.kind == "1d" else positions)


def rotate(config, kind: str):
    """The function that applies `Rotary`'s (cos, sin) to q and k ([b, heads, s, d]) for this kind (the
    partial rotary of GLM rotates the first dimensions and passes the rest)."""
    apply = _rotary(kind)[1]
    if apply is None:
        from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

        return apply_rotary_pos_emb
    section = config.rope_scaling["mrope_section"]
    return lambda q, k, cos, sin: apply(q, k, cos, sin, section)


class Attention(nn.Module):
    def __init__(self, config, spec: DecoderSpec, tp: TensorParallel, layer: int) -> None:
        super().__init__()
        self.head_dim = head_dim(config)
        self.heads = config.num_attention_heads // tp.size
        self.kv_heads = config.num_key_value_heads // tp.size
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)
        if spec.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.qk_norm, self.rotate = spec.qk_norm, rotate(config, spec.rotary)
        self.tp, self.layer = tp, layer

    def _qkv(self, x, cos, sin):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q, k, v  # [b, heads, s, d]

    def _out(self, o):
        b, _, s, _ = o.shape
        return self.tp.all_reduce(self.o_proj(o.transpose(1, 2).reshape(b, s, -1)))

    def forward(self, x, cos, sin, cache, batch):
        """x [b, s, hidden] -> [b, s, hidden]; `batch` (`paged_attention`'s PrefillBatch or DecodeBatch) writes
        this step's keys and values into the paged `cache` and attends over each sequence's own."""
        q, k, v = self._qkv(x, cos, sin)
        return self._out(batch.attend(q, k, v, cache.k[self.layer], cache.v[self.layer]))


class MLP(nn.Module):
    """SiLU-gated MLP. `fused`: gate and up as one gate_up_proj (this rank's gate rows, then its up rows);
    `reduce=False` leaves the all-reduce to the caller (an expert's partial sum)."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp: TensorParallel, fused: bool = False,
                 reduce: bool = True) -> None:
        super().__init__()
        inter = intermediate_size // tp.size
        if fused:
            self.gate_up_proj = nn.Linear(hidden_size, 2 * inter, bias=False)
        else:
            self.gate_proj = nn.Linear(hidden_size, inter, bias=False)
            self.up_proj = nn.Linear(hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden_size, bias=False)
        self.tp, self.fused, self.reduce = tp, fused, reduce

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1) if self.fused else (self.gate_proj(x), self.up_proj(x))
        out = self.down_proj(F.silu(gate) * up)
        return self.tp.all_reduce(out) if self.reduce else out


class Experts(nn.Module):
    """Fused expert weights, HF's layout: gate_up_proj [E, H, 2*I] (gate then up), down_proj [E, I, H];
    this rank holds I/tp of each."""

    def __init__(self, config, tp: TensorParallel) -> None:
        super().__init__()
        inter = config.moe_intermediate_size // tp.size
        self.gate_up_proj = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, 2 * inter))
        self.down_proj = nn.Parameter(torch.empty(config.num_experts, inter, config.hidden_size))


def _mix(x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, expert) -> torch.Tensor:
    """x [n, H], each token's chosen experts and their weights [n, k] -> sum over its k experts of
    expert(e, its rows) * weight, in the weights' dtype; only the experts some token chose run."""
    out = torch.zeros_like(x, dtype=weights.dtype)
    for e in chosen.unique().tolist():
        token, slot = torch.where(chosen == e)
        out.index_add_(0, token, expert(e, x[token]) * weights[token, slot, None])
    return out


class MoE(nn.Module):
    """Top-k routing (softmax, the k best renormalized: Qwen3's rule); only the experts some token chose run."""

    def __init__(self, config, tp: TensorParallel) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config, tp)
        self.tp = tp

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        weights, chosen = torch.topk(weights, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        return self.tp.all_reduce(_mix(x, chosen, weights, self._expert)).reshape(shape)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.experts.gate_up_proj[e]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.experts.down_proj[e]


class SharedMoE(nn.Module):
    """GLM-4.5V's MoE (DeepSeek-V3's): transformers' own router (sigmoid scores with a correction bias, the
    best groups, then the top k, renormalized and scaled; replicated), routed experts as separate MLPs,
    and shared experts every token goes through; one all-reduce for both."""

    def __init__(self, config, tp: TensorParallel) -> None:
        super().__init__()
        from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeTextTopkRouter

        self.gate = Glm4vMoeTextTopkRouter(config)
        inter = config.moe_intermediate_size
        self.experts = nn.ModuleList(MLP(config.hidden_size, inter, tp, reduce=False)
                                     for _ in range(config.n_routed_experts))
        self.shared_experts = MLP(config.hidden_size, inter * config.n_shared_experts, tp, reduce=False)
        self.tp = tp

    def forward(self, x):
        shape = x.shape
        chosen, weights = self.gate(x)
        x = x.reshape(-1, shape[-1])
        out = _mix(x, chosen, weights, lambda e, rows: self.experts[e](rows)).to(x.dtype) + self.shared_experts(x)
        return self.tp.all_reduce(out).reshape(shape)


def _sparse(config, spec: DecoderSpec, layer: int) -> bool:
    """Whether this layer's MLP is a MoE block, by the config's rule for the family's MoE."""
    if spec.moe == "qwen3":
        return layer not in (getattr(config, "mlp_only_layers", None) or []) and config.num_experts > 0 and \
            (layer + 1) % config.decoder_sparse_step == 0
    if spec.moe == "glm4":
        return layer >= config.first_k_dense_replace
    return False


class Layer(nn.Module):
    def __init__(self, config, spec: DecoderSpec, tp: TensorParallel, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, spec, tp, layer)
        if _sparse(config, spec, layer):
            self.mlp = MoE(config, tp) if spec.moe == "qwen3" else SharedMoE(config, tp)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, tp, fused=spec.fused_gate_up)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.sandwich = spec.sandwich_norm
        if self.sandwich:
            self.post_self_attn_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.post_mlp_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, attend):
        h = attend(self.self_attn, self.input_layernorm(x))
        x = x + (self.post_self_attn_layernorm(h) if self.sandwich else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (self.post_mlp_layernorm(h) if self.sandwich else h)
