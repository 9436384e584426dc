"""Split a request's images into encoder shards balanced by their tokens (the work), and gather them back.

Greedy largest-first (as SGLang and vLLM do): sort images by tokens, descending and stable;
give each to the shard with the smallest load so far (ties: lowest index). Empty shards run nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def balance(sizes: Sequence[int], num_shards: int,
            base: Sequence[int] | None = None) -> tuple[list[list[int]], list[int]]:
    """sizes: patches per image -> (image indices per shard, load per shard). `base`: each shard's load
    before these images (e.g. an encoder server's patches in flight).
    [1000, 100, 200, 50] on 2 shards -> ([[0], [2, 1, 3]], [1000, 350])."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    loads = list(base) if base is not None else [0] * num_shards
    if len(loads) != num_shards:
        raise ValueError(f"{len(loads)} base loads for {num_shards} shards")
    for image in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        shard = min(range(num_shards), key=lambda s: (loads[s], s))
        shards[shard].append(image)
        loads[shard] += sizes[image]
    return shards, loads


def gather(shard_outputs: Sequence[Sequence[np.ndarray]], shards: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Per-shard lists of per-image outputs (in each shard's order) -> per-image outputs in image order."""
    by_image = {image: out for images, outs in zip(shards, shard_outputs, strict=True)
                for image, out in zip(images, outs, strict=True)}
    return [by_image[i] for i in range(len(by_image))]
