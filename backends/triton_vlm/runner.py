"""The model side of the language engine: this rank's decoder shard and KV cache, one call per step.

On rank 0 (the engine) each call is first broadcast to the other ranks, which run the same call on
their shards (`serve_forever`); the all-reduces inside the layers keep them in step. Small step
arguments travel as Python objects, prompt embeddings as one tensor broadcast.
"""

from __future__ import annotations

import torch

from .tp import TensorParallel


class ModelRunner:
    def __init__(self, family, device: str, dtype: torch.dtype, tp: TensorParallel, slots: int, slot_len: int):
        self.tp, self.device, self.dtype = tp, torch.device(device), dtype
        self.model = family.load_decoder(device, dtype, tp)
        self.cache = self.model.new_cache(slots, slot_len)
        self.hidden_size = self.model.config.hidden_size

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(ids.to(self.device))

    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor, slots: list[int],
                lengths: list[int]) -> torch.Tensor:
        """Prompts one after another: embeds [1, T, H], positions [3, 1, T] -> logits [len(slots), V]."""
        if self.tp.size > 1:
            self.tp.broadcast(("prefill", slots, lengths, positions.tolist()))
            self.tp.broadcast_tensor(embeds, None, None, None)
        return self.model.prefill(embeds, positions.to(self.device), self.cache, slots, lengths)

    def decode(self, ids: list[int], positions: list[int], slots: list[int], lengths: list[int]) -> torch.Tensor:
        """One token for each of b sequences -> logits [b, V]. positions: the M-RoPE text position (t=h=w)."""
        self.tp.broadcast(("decode", ids, positions, slots, lengths))
        return self._decode(ids, positions, slots, lengths)

    def _decode(self, ids, positions, slots, lengths) -> torch.Tensor:
        d = self.device
        pos = torch.tensor(positions, device=d)[None, :, None].expand(3, -1, 1)
        return self.model.decode(torch.tensor(ids, device=d), pos, self.cache, list(slots),
                                 torch.tensor(lengths, device=d))

    def stop(self) -> None:
        self.tp.broadcast(("stop",))

    def serve_forever(self) -> None:
        """Ranks > 0: run what rank 0 runs until it says stop."""
        while True:
            command = self.tp.broadcast(None)
            if command[0] == "stop":
                return
            if command[0] == "prefill":
                _, slots, lengths, positions = command
                embeds = self.tp.broadcast_tensor(None, (1, sum(lengths), self.hidden_size), self.dtype, self.device)
                self.model.prefill(embeds, torch.tensor(positions, device=self.device), self.cache, slots, lengths)
            else:
                self._decode(*command[1:])
