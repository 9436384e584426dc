"""A family's language decoder, tensor-parallel, over a paged KV cache (gpt-fast / nano-vllm style), built
from `layers.py` as the family's `DecoderSpec` says.

HF parameter names (`model.layers.N.self_attn.q_proj.weight`, ...), so a rank loads its slice of the
checkpoint with `shard_taker`. Column-parallel: q/k/v (by heads), gate/up, each expert's gate/up.
Row-parallel: o_proj, down_proj, each expert's down, each followed by one all-reduce. Embeddings, norms,
routers and lm_head are replicated.

`prefill` runs prompt chunks of one or more sequences (one after another in one forward: the projections
see all their tokens at once) into their blocks, with the image features a family adds after its first
layers (Qwen3-VL's deepstack); `decode` runs one new token for each of a batch of sequences, each
attending to its own blocks. The batch (`paged_attention.py`) says where each token's keys go.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import DecoderSpec, Layer, RMSNorm
from .paged_attention import DecodeBatch, KVCache, PrefillBatch
from .rotary import Rotary
from .tp import TensorParallel


class Body(nn.Module):
    def __init__(self, config, spec: DecoderSpec, tp: TensorParallel) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = Rotary(config, spec.rotary)
        self.layers = nn.ModuleList(Layer(config, spec, tp, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class Decoder(nn.Module):
    """`model.*` + `lm_head`, this rank's shard."""

    def __init__(self, config, spec: DecoderSpec, tp: TensorParallel) -> None:
        super().__init__()
        sizes = ["num_attention_heads", "num_key_value_heads", "intermediate_size"]
        sizes += ["moe_intermediate_size"] if getattr(config, "moe_intermediate_size", None) else []
        for name in sizes:
            if getattr(config, name) % tp.size:
                raise ValueError(f"{name}={getattr(config, name)} is not divisible by tensor parallel size {tp.size}")
        self.config, self.spec, self.tp = config, spec, tp
        self.model = Body(config, spec, tp)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def new_cache(self, num_blocks: int, block_size: int) -> KVCache:
        attn = self.model.layers[0].self_attn
        w = self.lm_head.weight
        return KVCache(len(self.model.layers), num_blocks, block_size, attn.kv_heads, attn.head_dim, w.dtype,
                       w.device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def _run(self, x, positions, cache: KVCache, batch, deepstack=None) -> torch.Tensor:
        """deepstack: (image token indices [n], features [k, n, H]): feature i is added at those tokens
        after layer i (prefill of one packed row, x [1, T, H])."""
        cos, sin = self.model.rotary_emb(x, positions)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, lambda attn, h: attn(h, cos, sin, cache, batch))
            if deepstack is not None and i < len(deepstack[1]):
                x = x.index_add(1, deepstack[0], deepstack[1][i][None].to(x.dtype))
        return x

    def _logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(last_hidden))

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache, batch: PrefillBatch,
                deepstack=None) -> torch.Tensor:
        """Chunks one after another: embeds [1, T, H], positions [3, 1, T], deepstack (indices [n] into T,
        features [k, n, H]) or None -> logits [chunks, V] of each chunk's last token."""
        x = self._run(embeds, positions, cache, batch, deepstack)
        return self._logits(x[0, batch.ends])

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, batch: DecodeBatch) -> torch.Tensor:
        """ids [b], positions [3, b, 1] -> logits [b, V]."""
        x = self._run(self.embed(ids[:, None]), positions, cache, batch)
        return self._logits(x[:, -1])


_COLUMN = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
           "gate_proj.weight", "up_proj.weight")
_ROW = ("o_proj.weight", "down_proj.weight")


def shard_taker(rank: int, size: int):
    """For `weights.load_renamed(take=...)`: read only this rank's slice of each parallel tensor
    (column-parallel: rows of the weight; row-parallel: its columns; fused gate/up and fused experts:
    their intermediate dimension, gate and up each); the rest whole."""

    def part(n: int) -> slice:
        return slice(rank * (n // size), (rank + 1) * (n // size))

    def take(name: str, tensor):
        shape = tensor.get_shape()
        if name.endswith("mlp.gate_up_proj.weight"):  # [2I, H]: gate rows, then up rows
            inter = shape[0] // 2
            mine = part(inter)
            return torch.cat([tensor[mine], tensor[inter + mine.start:inter + mine.stop]])
        if name.endswith(_COLUMN):
            return tensor[part(shape[0])]
        if name.endswith(_ROW):
            return tensor[:, part(shape[1])]
        if name.endswith("experts.gate_up_proj"):  # [E, H, 2I]: gate [.., :I], up [.., I:]
            inter = shape[2] // 2
            mine = part(inter)
            return torch.cat([tensor[:, :, mine], tensor[:, :, inter + mine.start:inter + mine.stop]], dim=2)
        if name.endswith("experts.down_proj"):  # [E, I, H]
            return tensor[:, part(shape[1])]
        return tensor[:]

    return take


def load_decoder(config, spec: DecoderSpec, state_of, device: str, dtype: torch.dtype, tp: TensorParallel,
                 tie_word_embeddings: bool) -> Decoder:
    """This rank's shard, from `state_of(take)` (the family's renamed checkpoint tensors, read with `take`)."""
    with torch.device("meta"):
        model = Decoder(config, spec, tp)
    state = state_of(shard_taker(tp.rank, tp.size))
    if "lm_head.weight" not in state and tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=False, assign=True)
    model.model.rotary_emb = Rotary(config, spec.rotary)  # buffers, not weights: built off the meta device
    missing = {n for n, _ in model.named_parameters()} - set(state)
    if missing:
        raise ValueError(f"checkpoint lacks {sorted(missing)[:5]}")
    return model.to(device=device, dtype=dtype).eval()
