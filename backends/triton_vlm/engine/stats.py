"""The language engine's counts now (the metrics' source). Its own module: the `language_model` stub
unpickles them from the engine process with every batch of outputs, and a class of `language.py` would
make it import the engine and transformers (its start took 3.8 CPU-s, 1.5 without)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    running: int  # sequences admitted (prefilling or decoding)
    waiting: int  # accepted, not admitted yet (or preempted)
    prefill_tokens: int  # prompt tokens computed so far (cache hits are not computed)
    decode_tokens: int  # tokens decode steps computed so far
    blocks_in_use: int
    blocks_total: int
    prefix_queries: int  # tokens of admitted sequences looked up in the prefix cache
    prefix_hits: int  # of those, found cached
    preemptions: int
    imported_tokens: int = 0  # prompt tokens whose KV came from prefill engines' hand-offs
