"""The Qwen2 / Qwen2.5-VL language decoder, tensor-parallel, over a slot KV cache (gpt-fast / nano-vllm style).

HF parameter names (`model.layers.N.self_attn.q_proj.weight`, ...), so a rank loads its slice of the
checkpoint with `shard_state_dict`. Column-parallel: q/k/v (by heads), gate/up. Row-parallel: o_proj,
down_proj, each followed by one all-reduce. Embeddings, norms and lm_head are replicated. The rotary
embedding, M-RoPE sections and RMSNorm are transformers' own.

`prefill` runs the prompts of one or more sequences (one after another in one forward: the projections
see all their tokens at once) into their cache slots; `decode` runs one new token for each of a batch
of sequences, each attending to its own slot up to its own length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLRotaryEmbedding,
    Qwen2RMSNorm,
    apply_multimodal_rotary_pos_emb,
)

from ..tp import TensorParallel


class KVCache:
    """Per layer, keys and values of `slots` sequences of up to `slot_len` tokens (this rank's heads)."""

    def __init__(self, layers: int, slots: int, kv_heads: int, slot_len: int, head_dim: int, dtype, device) -> None:
        shape = (layers, slots, kv_heads, slot_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.slot_len = slots, slot_len


class Attention(nn.Module):
    def __init__(self, config, tp: TensorParallel, layer: int) -> None:
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.heads = config.num_attention_heads // tp.size
        self.kv_heads = config.num_key_value_heads // tp.size
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)
        self.mrope_section = config.rope_scaling["mrope_section"]
        self.tp, self.layer = tp, layer

    def _qkv(self, x, cos, sin):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_multimodal_rotary_pos_emb(q, k, cos, sin, self.mrope_section)
        return q, k, v  # [b, heads, s, d]

    def _out(self, o):
        b, _, s, _ = o.shape
        return self.tp.all_reduce(self.o_proj(o.transpose(1, 2).reshape(b, s, -1)))

    def prefill(self, x, cos, sin, cache: KVCache, slots: list[int], lengths: list[int]):
        """x: [1, T, hidden], the prompts of len(slots) sequences one after another (T = sum(lengths)).
        The projections run on all T tokens at once; each prompt attends only to itself."""
        q, k, v = self._qkv(x, cos, sin)
        outputs, start = [], 0
        for slot, n in zip(slots, lengths, strict=True):
            end = start + n
            cache.k[self.layer, slot, :, :n] = k[0, :, start:end]
            cache.v[self.layer, slot, :, :n] = v[0, :, start:end]
            outputs.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
                                                          is_causal=True, enable_gqa=True))
            start = end
        return self._out(torch.cat(outputs, dim=2))

    def decode(self, x, cos, sin, cache: KVCache, slots: torch.Tensor, rows, lengths: torch.Tensor):
        """x: [b, 1, hidden]; slots, lengths: [b] (tokens already in each slot = this token's index);
        rows: the slots as a slice when they are in a row (a view of the cache, no gather)."""
        q, k, v = self._qkv(x, cos, sin)
        cache.k[self.layer, slots, :, lengths] = k[:, :, 0]
        cache.v[self.layer, slots, :, lengths] = v[:, :, 0]
        span = int(lengths.max()) + 1
        keys, values = cache.k[self.layer, rows, :, :span], cache.v[self.layer, rows, :, :span]
        mask = (torch.arange(span, device=x.device)[None, :] <= lengths[:, None])[:, None, None, :]
        return self._out(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True))


def _rows(slots: list[int], index: torch.Tensor) -> slice | torch.Tensor:
    """Slots in a row read as a view of the cache; others are gathered (a copy)."""
    first = slots[0]
    return slice(first, first + len(slots)) if slots == list(range(first, first + len(slots))) else index


class MLP(nn.Module):
    def __init__(self, config, tp: TensorParallel) -> None:
        super().__init__()
        inter = config.intermediate_size // tp.size
        self.gate_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=False)
        self.tp = tp

    def forward(self, x):
        return self.tp.all_reduce(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Layer(nn.Module):
    def __init__(self, config, tp: TensorParallel, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, tp, layer)
        self.mlp = MLP(config, tp)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, attend):
        x = x + attend(self.self_attn, self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, config, tp: TensorParallel) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, tp, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2_5_VLRotaryEmbedding(config)


class Decoder(nn.Module):
    """`model.*` + `lm_head`, this rank's shard."""

    def __init__(self, config, tp: TensorParallel) -> None:
        super().__init__()
        for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            if getattr(config, name) % tp.size:
                raise ValueError(f"{name}={getattr(config, name)} is not divisible by tensor parallel size {tp.size}")
        self.config, self.tp = config, tp
        self.model = Body(config, tp)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def new_cache(self, slots: int, slot_len: int) -> KVCache:
        attn = self.model.layers[0].self_attn
        w = self.lm_head.weight
        return KVCache(len(self.model.layers), slots, attn.kv_heads, slot_len, attn.head_dim, w.dtype, w.device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def _run(self, x, positions, attend) -> torch.Tensor:
        cos, sin = self.model.rotary_emb(x, positions)
        for layer in self.model.layers:
            x = layer(x, lambda attn, h: attend(attn, h, cos, sin))
        return x

    def _logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(last_hidden))

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: list[int],
                lengths: list[int]) -> torch.Tensor:
        """Prompts one after another: embeds [1, T, H], positions [3, 1, T] -> logits [n, V] of each
        prompt's last token; prompt i goes into cache slot slots[i]."""
        x = self._run(embeds, positions, lambda attn, h, cos, sin: attn.prefill(h, cos, sin, cache, slots, lengths))
        ends = torch.tensor(lengths, device=x.device).cumsum(0) - 1
        return self._logits(x[0, ends])

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: list[int],
               lengths: torch.Tensor) -> torch.Tensor:
        """ids [b], positions [3, b, 1], slots/lengths [b] -> logits [b, V]."""
        x = self.embed(ids[:, None])
        index = torch.tensor(slots, device=ids.device)
        rows = _rows(slots, index)
        x = self._run(x, positions, lambda attn, h, cos, sin: attn.decode(h, cos, sin, cache, index, rows, lengths))
        return self._logits(x[:, -1])


_COLUMN = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
           "gate_proj.weight", "up_proj.weight")
_ROW = ("o_proj.weight", "down_proj.weight")


def shard_taker(rank: int, size: int):
    """For `weights.load_renamed(take=...)`: read only this rank's slice of each parallel tensor
    (column-parallel: rows of the weight; row-parallel: its columns); the rest whole."""

    def take(name: str, tensor):
        shape = tensor.get_shape()
        if name.endswith(_COLUMN):
            n = shape[0] // size
            return tensor[rank * n:(rank + 1) * n]
        if name.endswith(_ROW):
            n = shape[1] // size
            return tensor[:, rank * n:(rank + 1) * n]
        return tensor[:]

    return take
