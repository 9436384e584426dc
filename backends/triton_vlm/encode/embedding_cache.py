"""Image embeddings by content: the encode stage skips the encoder for an image it has seen.

The key (`preprocess/image_keys.py`, computed by preprocess from the encoded file) is a BLAKE2b digest of the file's
bytes and of everything else that changes the embeddings: the model's folder, its config and image
processor files, and its weight files' names, sizes and times. The local tier is an LRU bounded in
bytes; entries are private copies (a tensor that came through Triton may live in memory it reuses). A
shared Redis tier (`redis_tier.py`) may stand behind it: its hits are kept locally too."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

from .redis_tier import RedisTier


class EmbeddingCache:
    """Per-image embeddings [tokens, H]: a local LRU of at most `max_bytes`, and optionally a `shared` tier
    (`redis_tier.RedisTier`) behind it. Thread-safe."""

    def __init__(self, max_bytes: int, shared: RedisTier | None = None,
                 on_lookup: Callable[[dict[str, int], int], None] | None = None) -> None:
        self.max_bytes, self.shared = max_bytes, shared
        self.bytes = 0
        self.on_lookup = on_lookup  # ({tier: hits}, misses) of each request's lookup: metrics
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> tuple[torch.Tensor | None, str | None]:
        """(embeddings, the tier that had them: local | redis), or (None, None)."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
                return value, "local"
        value = self.shared.get(key) if self.shared is not None else None
        if value is None:
            return None, None
        self._put_local(key, value)
        return value, "redis"

    def put(self, key: bytes, value: torch.Tensor) -> None:
        self._put_local(key, value)
        if self.shared is not None:
            self.shared.put(key, value)

    def _put_local(self, key: bytes, value: torch.Tensor) -> None:
        size = value.nbytes
        if size > self.max_bytes:
            return
        value = value.clone()
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            self._entries[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes
