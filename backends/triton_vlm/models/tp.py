"""Tensor parallelism: the language model's ranks, their process group and the collectives they use (the
layers' all-reduce; rank 0's broadcasts of each step to the others). The layers hold a `TensorParallel`,
so it lives here, below the engine.

Rank 0 lives in the Triton stub; ranks 1..N-1 are worker processes it starts (`engine/tp_worker.py`).
NCCL on GPUs, gloo on CPU; the rendezvous is a file unique to rank 0's engine, so two servers on one
host never meet and no port is raced for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (the engine's step commands)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's `x` concatenated along `dim`, in rank order (on every rank)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=dim)

    def broadcast_tensor(self, x: torch.Tensor | None, shape, dtype, device) -> torch.Tensor:
        if self.size == 1:
            return x
        x = torch.empty(shape, dtype=dtype, device=device) if x is None else x.contiguous()
        dist.broadcast(x, src=0)
        return x


def init(rank: int, size: int, init_method: str, device: str) -> TensorParallel:
    if size > 1:
        from datetime import timedelta

        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device)  # NCCL collectives, object broadcasts included, use the current device
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                                timeout=timedelta(hours=24))
    return TensorParallel(rank, size)
