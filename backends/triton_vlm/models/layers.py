"""The shared layers our decoders are built from (tensor-parallel, over a paged KV cache); `rotary.py`
and `moe.py` hold the rotary embeddings and the sparse MLPs. No family is named here: each family's
`DecoderSpec` picks the parts.

- `Attention`: column-parallel q/k/v (by heads) with optional bias and optional q/k RMSNorm, an explicit
  `head_dim`, row-parallel o_proj and one all-reduce; the step's batch (`paged_attention.py`) stores
  keys and values in the paged cache and attends.
- `MLP` (dense, gate/up column- and down row-parallel; or gate and up fused as one gate_up_proj).
- `Layer`: pre-norm residual blocks (the family's MLP for the layer), with extra norms after attention
  and MLP when asked (GLM-4.1V's sandwich norms).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm as RMSNorm

from .rotary import RotarySpec, rotate
from .tp import TensorParallel


def dense_mlp(config, tp: TensorParallel, layer: int = 0, fused: bool = False) -> MLP:
    """Every layer's MLP, by default: dense, the config's intermediate size."""
    return MLP(config.hidden_size, config.intermediate_size, tp, fused=fused)


@dataclass(frozen=True)
class DecoderSpec:
    """What a family's decoder is built from (the config gives the sizes): its rotary embedding, its
    attention's options, and the MLP of each layer (`mlp(config, tp, layer)`; a family with sparse layers
    gives its own, e.g. a `moe.MoE` where its config puts one)."""

    rotary: RotarySpec
    qkv_bias: bool = True
    qk_norm: bool = False
    mlp: Callable[[Any, TensorParallel, int], nn.Module] = dense_mlp
    sandwich_norm: bool = False  # norms after attention and after the MLP too (GLM-4.1V)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


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


class Layer(nn.Module):
    def __init__(self, config, spec: DecoderSpec, tp: TensorParallel, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, spec, tp, layer)
        self.mlp = spec.mlp(config, tp, layer)
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
