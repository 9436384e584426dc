"""The shared tier against a real redis-server: values read back whole or not at all, and a Redis that
goes away is bypassed, then used again once it is back."""

from __future__ import annotations

import time

import pytest
import redis
import torch

from tests.conftest import redis_server
from triton_vlm.encode.redis_tier import PREFIX, RedisTier, pack, unpack


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_value_reads_back_whole(dtype):
    value = torch.randn(7, 5).to(dtype)
    assert torch.equal(unpack(pack(value)), value)


def test_a_corrupt_or_foreign_value_is_a_miss():
    blob = bytearray(pack(torch.randn(4, 3)))
    blob[-1] ^= 1
    assert unpack(bytes(blob)) is None
    assert unpack(b"not ours") is None and unpack(pack(torch.randn(2))[:-4]) is None


def test_redis_down_is_bypassed_and_used_again_once_back():
    with redis_server() as (url, port):
        tier = RedisTier(url, retry_s=0.5)
        value = torch.randn(3, 4)
        tier.put(b"k", value)
        assert torch.equal(tier.get(b"k"), value)
        redis.Redis(port=port).set(PREFIX + b"bad", b"garbage")
        assert tier.get(b"bad") is None
    start = time.monotonic()
    assert tier.get(b"k") is None and time.monotonic() - start < 2  # down: a miss, quickly
    tier.put(b"k2", value)  # never raises
    with redis_server(port):
        time.sleep(0.6)  # past retry_s
        tier.put(b"k", value)
        assert torch.equal(tier.get(b"k"), value)
