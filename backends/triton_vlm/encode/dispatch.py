"""The encode stage: split a request's images into shards balanced by their tokens, run them in parallel
on the vision encoder replicas, gather the embeddings (and their extras, as columns) back in image order.
Images are split into the family's pieces first (InternVL: tiles), so one image's encoding may be
spread over several replicas; its rows come back in order all the same.

`ShardedEncode` knows nothing of Triton. `split(images)` says which images go together and where
(`even(n)`: n balanced shards for local replicas, Triton picks the instance; `RemoteEncoders.split`:
one shard per encoder server, weighted by their load), and `run_shard(images, target) -> embeddings`
runs one shard there. `submit` returns at once and answers through a callback, so one stage instance
serves many requests at the same time: concurrent requests never wait for each other here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import InvalidRequest
from ..preprocess.image_inputs import Images
from .balance import balance, gather
from .embedding_cache import EmbeddingCache

Target = Hashable | None  # where a shard runs: None is "any local replica"
Split = Callable[[Images], list[tuple[Target, list[int]]]]  # images -> shards (image indices, where)
RunShard = Callable[[Images, Target], torch.Tensor]
Done = Callable[[torch.Tensor | None, Exception | None], None]
Pieces = Callable[[Images], tuple[Images, list[int]]]  # images -> their pieces, and each piece's image


def even(num_shards: int) -> Split:
    """Up to `num_shards` token-balanced shards, for local replicas (no target: Triton picks one)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")

    def split(images: Images) -> list[tuple[Target, list[int]]]:
        shards, _ = balance(images.tokens.tolist(), min(num_shards, len(images)) or 1)
        return [(None, s) for s in shards if s]

    return split


@contextlib.contextmanager
def _numbered_as(indices: list[int]):
    """Errors about a subset of the images name them as the request does: "image 1" of the subset is
    image indices[1]."""
    try:
        yield
    except InvalidRequest as e:
        raise InvalidRequest(re.sub(r"^image (\d+)", lambda m: f"image {indices[int(m[1])]}", str(e))) from None


class ShardedEncode:
    def __init__(self, run_shard: RunShard, split: Split, width: int, max_requests: int = 64, max_shards: int = 8,
                 cache: EmbeddingCache | None = None, on_split: Callable[[int], None] | None = None,
                 pieces: Pieces | None = None) -> None:
        """`on_split(shards)`: told how many shards each encoding is split into (a metric). `pieces`: splits
        images into the family's pieces (`Images.pieces`)."""
        self.run_shard, self.split, self.pieces = run_shard, split, pieces
        self.width, self.cache, self.on_split = width, cache, on_split  # width: columns of an embedding row
        # requests and the extra shards of a request get separate pools: a request thread waits on its
        # shards, and a shard never waits on anything, so the pools cannot deadlock. Threads start lazily.
        self._requests = ThreadPoolExecutor(max_requests, thread_name_prefix="encode-request")
        self._shards = ThreadPoolExecutor(max_requests * max_shards, thread_name_prefix="encode-shard")

    def encode(self, images: Images, keys: Sequence[bytes] = ()) -> torch.Tensor:
        """A request's images -> embeddings [sum tokens, H], image after image. With `keys` (one content
        key per image) and a cache, only the images not cached are encoded, each distinct one once."""
        if len(images) == 0:  # text only: nothing to run
            return torch.zeros((0, self.width), dtype=torch.float32)
        if len(keys) != len(images):
            return self._encode(images)
        images = dataclasses.replace(images, keys=tuple(keys))  # the shards carry them (E/PD: to the encoders)
        if self.cache is None:
            return self._encode(images)
        looked_up = [self.cache.get(key) for key in keys]
        found = [value for value, _ in looked_up]
        first: dict[bytes, int] = {}  # key -> the image that is encoded for it
        misses = [i for i, key in enumerate(keys) if found[i] is None and first.setdefault(key, i) == i]
        if misses:
            with _numbered_as(misses):
                encoded = torch.split(self._encode(images.select(misses)), [int(images.tokens[i]) for i in misses])
            for i, embeds in zip(misses, encoded, strict=True):
                found[i] = embeds
                self.cache.put(keys[i], embeds)
        if self.cache.on_lookup:  # a repeat inside the request is a local hit: it is not encoded again
            hits = Counter(tier or "local" for _, tier in looked_up)
            hits["local"] -= len(misses)
            self.cache.on_lookup(dict(hits), len(misses))
        return torch.cat([f if f is not None else found[first[key]] for f, key in zip(found, keys, strict=True)])

    def _encode(self, images: Images) -> torch.Tensor:
        owner = list(range(len(images)))  # the request's image of each unit of work
        if self.pieces is not None:
            images, owner = self.pieces(images)
        shards = self.split(images)
        if self.on_split is not None:
            self.on_split(len(shards))
        if len(shards) == 1:  # one image, one replica or a small request: unsplit
            with _numbered_as(owner):
                return self.run_shard(images, shards[0][0])

        def run(target: Target, indices: list[int]) -> list[torch.Tensor]:
            with _numbered_as([owner[i] for i in indices]):
                embeds = self.run_shard(images.select(indices), target)
            return list(torch.split(embeds, [int(images.tokens[i]) for i in indices]))

        others = [self._shards.submit(run, *shard) for shard in shards[1:]]
        first = run(*shards[0])  # this thread runs the first shard itself
        outputs = [first, *(f.result() for f in others)]
        embeds = gather(outputs, [indices for _, indices in shards])
        return torch.cat([e.to(embeds[0].device) for e in embeds])  # replicas on other GPUs: to the first's

    def submit(self, images: Images, done: Done, keys: Sequence[bytes] = ()) -> None:
        """Encode on a worker thread; `done(embeddings, None)` or `done(None, error)` when finished."""

        def work() -> None:
            try:
                result = self.encode(images, keys)
            except Exception as e:
                done(None, e)
            else:
                done(result, None)

        self._requests.submit(work)

    def shutdown(self) -> None:
        self._requests.shutdown(wait=True, cancel_futures=False)
        self._shards.shutdown(wait=True)
