"""The model side of the language engine: this rank's decoder shard and paged KV cache, the model inputs of
a step, one call per step.

On rank 0 (the engine) each call is first broadcast to the other ranks, which run the same call on
their shards (`serve_forever`); the all-reduces inside the layers keep them in step. Block tables and
other small step arguments travel as Python objects, chunk embeddings (and image extras) as tensor
broadcasts. Every rank's cache has the same blocks (each holds its own kv heads of them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.paged_attention import DecodeBatch, PrefillBatch
from ..models.tp import TensorParallel
from . import kv_handoff
from .sequence import Sequence


@dataclass
class Chunk:
    """Tokens start..start+n-1 of one sequence, ready to prefill."""

    embeds: torch.Tensor  # [1, n, H], image embeddings spliced in
    positions: torch.Tensor  # [3, 1, n]
    start: int
    table: list[int]  # the sequence's block table
    extra_at: torch.Tensor | None = None  # [m] the chunk's image tokens, when the family has extras
    extras: torch.Tensor | None = None  # [k, m, H] (Qwen3-VL's deepstack features)

    @property
    def length(self) -> int:
        return self.embeds.shape[1]


def kv_budget(family, config, dtype: torch.dtype) -> tuple[int, int]:
    """(blocks in the pool, the context): `kv_cache_mb` of blocks on each rank, but no more than
    `max_num_seqs` sequences of the whole context take."""
    context = config.max_model_len or family.max_model_len
    per_block = family.kv_bytes_per_token(dtype, config.tensor_parallel) * config.block_size
    full = config.max_num_seqs * -(-context // config.block_size)
    return max(1, min(config.kv_cache_mb * 2**20 // per_block, full)), context


class ModelRunner:
    def __init__(self, family, device: str, dtype: torch.dtype, tp: TensorParallel, num_blocks: int,
                 block_size: int) -> None:
        self.family, self.tp, self.device, self.dtype = family, tp, torch.device(device), dtype
        self.model = family.load_decoder(device, dtype, tp)
        self.cache = self.model.new_cache(num_blocks, block_size)
        self.block_size = block_size
        self.hidden_size = self.model.config.hidden_size
        self.extra_features = family.extra_features

    @torch.inference_mode()
    def chunk(self, seq: Sequence, n: int) -> Chunk:
        """The model inputs of the sequence's next n tokens: their embeddings with the image rows spliced
        over the image tokens (a chunk may begin or end inside an image), their positions and extras."""
        start = seq.num_computed
        embeds = self.model.embed(torch.tensor(seq.token_ids[start:start + n], device=self.device))[None]
        at, rows = seq.image_rows_in(start, start + n)
        at, extras = torch.as_tensor(at, device=self.device), None
        if len(at):
            image, extras = self.family.split_features(rows.to(device=self.device, dtype=embeds.dtype))
            embeds[0, at] = image
        positions = torch.as_tensor(seq.positions_of(start, start + n), device=self.device)[:, None, :]
        if not self.extra_features:
            at = None
        elif extras is None:
            extras = torch.zeros((self.extra_features, 0, self.hidden_size), dtype=embeds.dtype, device=self.device)
        return Chunk(embeds, positions, start, list(seq.block_table), at, extras)

    def prefill(self, chunks: list[Chunk]) -> torch.Tensor:
        """Chunks one after another in one forward -> logits [len(chunks), V] of each chunk's last token."""
        lengths = [c.length for c in chunks]
        tables, starts = [c.table for c in chunks], [c.start for c in chunks]
        embeds = torch.cat([c.embeds for c in chunks], dim=1)
        positions = torch.cat([c.positions for c in chunks], dim=2)
        at, extras = None, None
        if self.extra_features:  # every chunk's image tokens, as indices into the joined chunks
            offsets = [sum(lengths[:i]) for i in range(len(chunks))]
            at = torch.cat([c.extra_at + offset for c, offset in zip(chunks, offsets, strict=True)])
            extras = torch.cat([c.extras for c in chunks], dim=1).to(self.dtype)
        if self.tp.size > 1:
            self.tp.broadcast(("prefill", tables, starts, lengths, positions.tolist(),
                               None if at is None else at.tolist()))
            self.tp.broadcast_tensor(embeds, None, None, None)
            if extras is not None:
                self.tp.broadcast_tensor(extras, None, None, None)
        return self._prefill(embeds, positions, tables, starts, lengths, at, extras)

    def _prefill(self, embeds, positions, tables, starts, lengths, at, extras) -> torch.Tensor:
        deepstack = None if at is None or not len(at) else (at, extras)
        batch = PrefillBatch(tables, starts, lengths, self.block_size, self.device)
        return self.model.prefill(embeds, positions.to(self.device), self.cache, batch, deepstack)

    def decode(self, ids: list[int], positions: list[int], tables: list[list[int]], lengths: list[int]) -> torch.Tensor:
        """One token for each of b sequences -> logits [b, V]. positions: the text position (t=h=w);
        lengths: the tokens each has in the cache before this one."""
        self.tp.broadcast(("decode", ids, positions, tables, lengths))
        return self._decode(ids, positions, tables, lengths)

    def _decode(self, ids, positions, tables, lengths) -> torch.Tensor:
        d = self.device
        pos = torch.tensor(positions, device=d)[None, :, None].expand(3, -1, 1)
        batch = DecodeBatch(tables, lengths, self.block_size, d)
        return self.model.decode(torch.tensor(ids, device=d), pos, self.cache, batch)

    def read_kv(self, table: list[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a sequence's tokens start..end-1, every head (the ranks' slices gathered)."""
        self.tp.broadcast(("read_kv", table, start, end))
        return self._read_kv(table, start, end)

    def _read_kv(self, table, start, end) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = kv_handoff.read(self.cache, table, start, end, self.block_size)
        return self.tp.gather(keys, dim=2), self.tp.gather(values, dim=2)

    def write_kv(self, table: list[int], start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Every head's keys and values of tokens start..start+len-1 into a sequence's blocks: each rank its
        slice."""
        if self.tp.size > 1:
            self.tp.broadcast(("write_kv", table, start, tuple(keys.shape)))
            keys = self.tp.broadcast_tensor(keys.to(self.device), None, None, None)
            values = self.tp.broadcast_tensor(values.to(self.device), None, None, None)
        self._write_kv(table, start, keys, values)

    def _write_kv(self, table, start, keys, values) -> None:
        heads = self.cache.k.shape[2]
        mine = slice(self.tp.rank * heads, (self.tp.rank + 1) * heads)
        kv_handoff.write(self.cache, table, start, keys[:, :, mine], values[:, :, mine], self.block_size)

    def stop(self) -> None:
        self.tp.broadcast(("stop",))

    def serve_forever(self) -> None:
        """Ranks > 0: run what rank 0 runs until it says stop."""
        while True:
            command = self.tp.broadcast(None)
            if command[0] == "stop":
                return
            if command[0] == "read_kv":
                self._read_kv(*command[1:])
            elif command[0] == "write_kv":
                _, table, start, shape = command
                keys = self.tp.broadcast_tensor(None, shape, self.dtype, self.device)
                values = self.tp.broadcast_tensor(None, shape, self.dtype, self.device)
                self._write_kv(table, start, keys, values)
            elif command[0] == "prefill":
                _, tables, starts, lengths, positions, at = command
                embeds = self.tp.broadcast_tensor(None, (1, sum(lengths), self.hidden_size), self.dtype, self.device)
                extras = None
                if at is not None:
                    at = torch.tensor(at, dtype=torch.long, device=self.device)
                    extras = self.tp.broadcast_tensor(None, (self.extra_features, len(at), self.hidden_size),
                                                      self.dtype, self.device)
                self._prefill(embeds, torch.tensor(positions, device=self.device), tables, starts, lengths, at,
                              extras)
            else:
                self._decode(*command[1:])
