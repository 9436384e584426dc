"""The embedding cache's shared tier: Redis, so that several language servers share what each encoded.

A value carries its dtype, shape and a checksum: anything that does not read back whole is a miss,
never a wrong answer. Redis being slow, down or full never fails a request: the tier is bypassed with a
warning (short socket timeouts) and tried again `retry_s` later."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time

import torch

log = logging.getLogger(__name__)
MAGIC = b"TVLMEMB1"
PREFIX = b"triton-vlm:embedding:"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pack(value: torch.Tensor) -> bytes:
    value = value.detach().contiguous().cpu()
    dtype = str(value.dtype).removeprefix("torch.")
    payload = (value.view(torch.int16) if dtype == "bfloat16" else value).numpy().tobytes()
    header = json.dumps({"dtype": dtype, "shape": list(value.shape)}).encode()
    checksum = hashlib.blake2b(header + payload, digest_size=16).digest()
    return MAGIC + len(header).to_bytes(4, "little") + header + checksum + payload


def unpack(blob: bytes) -> torch.Tensor | None:
    """The tensor, or None for anything that is not a whole value of ours."""
    try:
        if not blob.startswith(MAGIC):
            return None
        n = int.from_bytes(blob[8:12], "little")
        header, checksum, payload = blob[12:12 + n], blob[12 + n:28 + n], blob[28 + n:]
        if hashlib.blake2b(header + payload, digest_size=16).digest() != checksum:
            return None
        meta = json.loads(header)
        dtype, shape = DTYPES[meta["dtype"]], tuple(meta["shape"])
        raw = torch.frombuffer(bytearray(payload), dtype=torch.int16 if dtype == torch.bfloat16 else dtype)
        value = raw.view(torch.bfloat16) if dtype == torch.bfloat16 else raw
        return value.reshape(shape) if value.numel() == int(torch.tensor(shape).prod()) else None
    except (ValueError, KeyError, TypeError, RuntimeError):
        return None


class RedisTier:
    def __init__(self, url: str, timeout_s: float = 0.25, retry_s: float = 5.0, ttl_s: int = 24 * 3600) -> None:
        import redis

        self.url, self.retry_s, self.ttl_s = url, retry_s, ttl_s
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._down_until = 0.0
        self._lock = threading.Lock()

    def get(self, key: bytes) -> torch.Tensor | None:
        blob = self._call(self._redis.get, PREFIX + key)
        return unpack(blob) if blob else None

    def put(self, key: bytes, value: torch.Tensor) -> None:
        self._call(self._redis.set, PREFIX + key, pack(value), ex=self.ttl_s)

    def _call(self, method, *args, **kwargs):
        if time.monotonic() < self._down_until:
            return None
        try:
            return method(*args, **kwargs)
        except Exception as e:  # down, slow, full (OOM), anything: this request goes on without the tier
            with self._lock:
                if time.monotonic() >= self._down_until:
                    log.warning("embedding cache: Redis at %s failed (%s); bypassed for %.0f s", self.url, e,
                                self.retry_s)
                self._down_until = time.monotonic() + self.retry_s
            return None
