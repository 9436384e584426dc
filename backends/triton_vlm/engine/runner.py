"""The model side of the language engine: this rank's decoder shard and KV cache, one call per step.

On rank 0 (the engine) each call is first broadcast to the other ranks, which run the same call on
their shards (`serve_forever`); the all-reduces inside the layers keep them in step. Small step
arguments travel as Python objects, prompt embeddings (and image extras) as tensor broadcasts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tp import TensorParallel


@dataclass
class PromptInputs:
    """One prompt, ready to prefill."""

    embeds: torch.Tensor  # [1, S, H], image embeddings spliced in
    positions: torch.Tensor  # [3, 1, S]
    delta: int  # a generated token at index i >= S has position i + delta
    extra_at: torch.Tensor | None = None  # [n] the image tokens' indices, when the family has extras
    extras: torch.Tensor | None = None  # [k, n, H] (Qwen3-VL's deepstack features)

    @property
    def length(self) -> int:
        return self.embeds.shape[1]


class ModelRunner:
    def __init__(self, family, device: str, dtype: torch.dtype, tp: TensorParallel, slots: int, slot_len: int):
        self.tp, self.device, self.dtype = tp, torch.device(device), dtype
        self.model = family.load_decoder(device, dtype, tp)
        self.cache = self.model.new_cache(slots, slot_len)
        self.hidden_size = self.model.config.hidden_size
        self.extra_features = family.extra_features

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(ids.to(self.device))

    def prefill(self, prompts: list[PromptInputs], slots: list[int]) -> torch.Tensor:
        """Prompts one after another in one forward -> logits [len(slots), V]; prompt i fills slots[i]."""
        lengths = [p.length for p in prompts]
        embeds = torch.cat([p.embeds for p in prompts], dim=1)
        positions = torch.cat([p.positions for p in prompts], dim=2)
        at, extras = None, None
        if self.extra_features:  # every prompt's image tokens, as indices into the joined prompts
            starts = [sum(lengths[:i]) for i in range(len(prompts))]
            at = torch.cat([p.extra_at.to(self.device) + s for p, s in zip(prompts, starts, strict=True)])
            extras = torch.cat([p.extras for p in prompts], dim=1).to(self.dtype)
        if self.tp.size > 1:
            self.tp.broadcast(("prefill", slots, lengths, positions.tolist(), None if at is None else at.tolist()))
            self.tp.broadcast_tensor(embeds, None, None, None)
            if extras is not None:
                self.tp.broadcast_tensor(extras, None, None, None)
        return self._prefill(embeds, positions, slots, lengths, at, extras)

    def _prefill(self, embeds, positions, slots, lengths, at, extras) -> torch.Tensor:
        deepstack = None if at is None or not len(at) else (at, extras)
        return self.model.prefill(embeds, positions.to(self.device), self.cache, slots, lengths, deepstack)

    def decode(self, ids: list[int], positions: list[int], slots: list[int], lengths: list[int]) -> torch.Tensor:
        """One token for each of b sequences -> logits [b, V]. positions: the text position (t=h=w)."""
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
                _, slots, lengths, positions, at = command
                embeds = self.tp.broadcast_tensor(None, (1, sum(lengths), self.hidden_size), self.dtype, self.device)
                extras = None
                if at is not None:
                    at = torch.tensor(at, dtype=torch.long, device=self.device)
                    extras = self.tp.broadcast_tensor(None, (self.extra_features, len(at), self.hidden_size),
                                                      self.dtype, self.device)
                self._prefill(embeds, torch.tensor(positions, device=self.device), slots, lengths, at, extras)
            else:
                self._decode(*command[1:])
