"""A prompt's KV cache handed from one engine to another: the step under prefill/decode disaggregation.

A prefill engine runs a request marked `prefill_only` as usual up to its first token; then, instead of
decoding on, it reads the prompt's keys and values out of its blocks and ends the request with them
(`StepOutput.handoff`). Its blocks go back to the pool, keyed, so a later prompt with the same prefix is
a prefix-cache hit there. A decode engine takes the same request with that `PrefilledKV`: it admits the
sequence by writing the keys and values into its own blocks (only past the prefix it has cached itself),
appends the first token, and decodes from there. What a decode engine needs beyond the KV: the first
token, the M-RoPE delta (checked against its own: the prompt and the images' layouts must be the same),
and a seeded sampler's state (so seeded sampling continues as it would on one engine).

The payload is one tensor pair, [layers, tokens, kv_heads, head_dim] each, whatever the block size on
either side. With tensor parallelism each rank holds its own heads: not built yet (refused clearly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidRequest


@dataclass
class PrefilledKV:
    keys: torch.Tensor  # [layers, prompt tokens, kv_heads, head_dim], the cache's dtype
    values: torch.Tensor
    first_token: int  # what the prefill engine sampled after the prompt
    delta: int  # the M-RoPE position delta of the prompt (text positions after it: index + delta)
    generator_state: torch.Tensor | None = None  # a seeded sampler's state after that first token

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2


def slots(table: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """The cache slots of token positions start..end-1 of a sequence with block table `table`."""
    positions = torch.arange(start, end)
    return torch.tensor(table, dtype=torch.long)[positions // block_size] * block_size + positions % block_size


def read(cache, table: list[int], tokens: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of a sequence's first `tokens` tokens, copied out of the cache."""
    index = slots(table, 0, tokens, block_size).to(cache.k.device)
    return cache.k.index_select(1, index), cache.v.index_select(1, index)


def write(cache, table: list[int], start: int, kv: PrefilledKV, block_size: int) -> None:
    """Write the hand-off's tokens start.. into the sequence's blocks (those before `start` are cached here)."""
    expected = (cache.k.shape[0], kv.num_tokens, *cache.k.shape[2:])
    if tuple(kv.keys.shape) != expected or tuple(kv.values.shape) != expected or kv.keys.dtype != cache.k.dtype:
        raise InvalidRequest(f"the handed-off KV is {list(kv.keys.shape)} {kv.keys.dtype}; this engine's cache "
                             f"takes {list(expected)} {cache.k.dtype}")
    index = slots(table, start, kv.num_tokens, block_size).to(cache.k.device)
    cache.k.index_copy_(1, index, kv.keys[:, start:].to(cache.k.device))
    cache.v.index_copy_(1, index, kv.values[:, start:].to(cache.v.device))
