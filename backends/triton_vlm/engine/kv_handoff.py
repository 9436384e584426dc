"""A prompt's KV cache handed from one engine to another: the step under prefill/decode disaggregation.

A prefill engine runs a request marked `prefill_only` as usual up to its first token; then, instead of
decoding on, it reads the prompt's keys and values out of its blocks and ends the request with them
(`StepOutput.handoff`). Its blocks go back to the pool, keyed, so a later prompt with the same prefix is
a prefix-cache hit there. A decode engine takes the same request with that `PrefilledKV`: it admits the
sequence by writing the keys and values into its own blocks (only past the prefix it has cached itself),
appends the first token, and decodes from there. A decode engine that asks for the KV of a prompt it has
partly cached (`LanguageRequest.kv_from`) gets only the rest (`PrefilledKV.start`); should its cached
prefix be evicted before the hand-off arrives, it computes the prompt itself. What a decode engine needs
beyond the KV: the first token, the M-RoPE delta (checked against its own: the prompt and the images'
layouts must be the same), and a seeded sampler's state (so seeded sampling continues as it would on one
engine).

The payload is one tensor pair, [layers, tokens, kv_heads, head_dim] each: every head, whatever the block
size and the tensor parallelism on either side (ranks hold slices of the heads: the runner gathers them
on a prefill engine and gives each rank its slice on a decode engine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidRequest


@dataclass
class PrefilledKV:
    keys: torch.Tensor  # [layers, tokens start.., kv_heads, head_dim], the cache's dtype
    values: torch.Tensor
    first_token: int  # what the prefill engine sampled after the prompt
    delta: int  # the M-RoPE position delta of the prompt (text positions after it: index + delta)
    generator_state: torch.Tensor | None = None  # a seeded sampler's state after that first token
    start: int = 0  # the prompt's tokens before this are not in it: the decode engine has them cached

    @property
    def num_tokens(self) -> int:
        """The prompt's tokens: those before `start` and those it holds."""
        return self.start + self.keys.shape[1]


def slots(table: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """The cache slots of token positions start..end-1 of a sequence with block table `table`."""
    positions = torch.arange(start, end)
    return torch.tensor(table, dtype=torch.long)[positions // block_size] * block_size + positions % block_size


def read(cache, table: list[int], start: int, end: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's keys and values (its heads) of a sequence's tokens start..end-1, copied out of the cache."""
    index = slots(table, start, end, block_size).to(cache.k.device)
    return cache.k.index_select(1, index), cache.v.index_select(1, index)


def check(kv: PrefilledKV, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    """A hand-off this engine can take (all heads, whatever its ranks), or InvalidRequest."""
    expected = (layers, kv.keys.shape[1], kv_heads, head_dim)
    if tuple(kv.keys.shape) != expected or tuple(kv.values.shape) != expected or kv.keys.dtype != dtype:
        raise InvalidRequest(f"the handed-off KV is {list(kv.keys.shape)} {kv.keys.dtype}; this engine's cache "
                             f"takes {list(expected)} {dtype}")


def write(cache, table: list[int], start: int, keys: torch.Tensor, values: torch.Tensor, block_size: int) -> None:
    """Write `keys`/`values` (this rank's heads), tokens start..start+len-1, into the sequence's blocks."""
    index = slots(table, start, start + keys.shape[1], block_size).to(cache.k.device)
    cache.k.index_copy_(1, index, keys.to(cache.k.device))
    cache.v.index_copy_(1, index, values.to(cache.v.device))
