"""The encode stage: split a request's images into patch-balanced shards, run them in parallel on the
vision encoder replicas, gather the embeddings back in image order.

`ShardedEncode` knows nothing of Triton: it calls `run_shard(pixel_values, grid_thw) -> embeddings`,
which the `encode` model implements as a BLS call to `vision_encoder` (Triton picks a free instance).
`submit` returns at once and answers through a callback, so one stage instance serves many
requests at the same time: concurrent requests never wait for each other here.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .balance import balance, gather

RunShard = Callable[[torch.Tensor, np.ndarray], torch.Tensor]
Done = Callable[[torch.Tensor | None, Exception | None], None]


class ShardedEncode:
    def __init__(self, run_shard: RunShard, num_shards: int, tokens_per_image: Callable[[np.ndarray], np.ndarray],
                 hidden_size: int, max_requests: int = 64) -> None:
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.run_shard, self.num_shards, self.tokens_per_image = run_shard, num_shards, tokens_per_image
        self.hidden_size = hidden_size
        # requests and the extra shards of a request get separate pools: a request thread waits on its
        # shards, and a shard never waits on anything, so the pools cannot deadlock.
        self._requests = ThreadPoolExecutor(max_requests, thread_name_prefix="encode-request")
        # threads start lazily; room for num_shards to grow while serving (E/PD live scaling)
        self._shards = ThreadPoolExecutor(max_requests * max(num_shards, 8), thread_name_prefix="encode-shard")

    def plan(self, grid_thw: np.ndarray) -> list[list[int]]:
        """The non-empty shards (image indices) for a request's images."""
        patches = np.prod(np.asarray(grid_thw).reshape(-1, 3), axis=1)
        shards, _ = balance(patches.tolist(), min(self.num_shards, len(patches)) or 1)
        return [s for s in shards if s]

    def encode(self, pixel_values: torch.Tensor, grid_thw: np.ndarray) -> torch.Tensor:
        """pixel_values [P, D] (image after image), grid_thw [N, 3] -> embeddings [sum tokens, H]."""
        grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
        shards = self.plan(grid)
        if not shards:  # text only: nothing to run
            return torch.zeros((0, self.hidden_size), dtype=torch.float32)
        if len(shards) == 1:  # one image or one replica: unsplit
            return self.run_shard(pixel_values, grid)
        rows = np.concatenate([[0], np.cumsum(np.prod(grid, axis=1))])
        tokens = self.tokens_per_image(grid)

        def run(images: list[int]) -> list[torch.Tensor]:
            pixels = torch.cat([pixel_values[rows[i]:rows[i + 1]] for i in images])
            embeds = self.run_shard(pixels, grid[images])
            return list(torch.split(embeds, [int(tokens[i]) for i in images]))

        others = [self._shards.submit(run, images) for images in shards[1:]]
        first = run(shards[0])  # this thread runs the first shard itself
        outputs = [first, *(f.result() for f in others)]
        return torch.cat(gather(outputs, shards))

    def submit(self, pixel_values: torch.Tensor, grid_thw: np.ndarray, done: Done) -> None:
        """Encode on a worker thread; `done(embeddings, None)` or `done(None, error)` when finished."""

        def work() -> None:
            try:
                result = self.encode(pixel_values, grid_thw)
            except Exception as e:
                done(None, e)
            else:
                done(result, None)

        self._requests.submit(work)

    def shutdown(self) -> None:
        self._requests.shutdown(wait=True, cancel_futures=False)
        self._shards.shutdown(wait=True)
