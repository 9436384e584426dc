"""A `PrefilledKV` as two tensors, for a hand-off over Triton gRPC (`--kv-transport grpc`): the keys and
then the values as raw bytes in the cache's dtype (bfloat16 has no numpy type), and a JSON header with
their shape and dtype, the first token, the M-RoPE delta, the first token it holds, a seeded
sampler's state, and when it was sent (the receiver times the transfer by it: one clock on loopback)."""

from __future__ import annotations

import base64
import json
import time

import numpy as np
import torch

from ..errors import InvalidRequest
from .kv_handoff import PrefilledKV


def pack(kv: PrefilledKV, **extra) -> tuple[np.ndarray, bytes]:
    """-> (uint8 [keys' bytes + values' bytes], the JSON header, with `extra` fields)."""
    raw = torch.cat([kv.keys.contiguous().reshape(-1).view(torch.uint8),
                     kv.values.contiguous().reshape(-1).view(torch.uint8)])
    state = kv.generator_state
    header = {"shape": list(kv.keys.shape), "dtype": str(kv.keys.dtype).removeprefix("torch."),
              "first_token": int(kv.first_token), "delta": int(kv.delta), "start": int(kv.start),
              "generator_state": None if state is None else base64.b64encode(state.numpy().tobytes()).decode(),
              "sent_at": time.time(), **extra}
    return raw.cpu().numpy(), json.dumps(header).encode()


def unpack(raw: np.ndarray, header: bytes) -> PrefilledKV:
    meta = json.loads(header)
    dtype = getattr(torch, meta["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidRequest(f"the handed-off KV's dtype {meta['dtype']!r} is no torch dtype")
    data = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.uint8).copy()).view(dtype)
    keys, values = data.chunk(2)
    shape = meta["shape"]
    state = meta["generator_state"]
    return PrefilledKV(keys.reshape(shape), values.reshape(shape), int(meta["first_token"]), int(meta["delta"]),
                       None if state is None else torch.frombuffer(bytearray(base64.b64decode(state)),
                                                                   dtype=torch.uint8),
                       int(meta["start"]))


def sent_at(header: bytes) -> float:
    """When the header was packed (wall clock)."""
    return float(json.loads(header)["sent_at"])
