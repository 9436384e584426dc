"""A prompt's KV on the wire: the gRPC answer's byte tensor and header (`kv_wire.py`), and NIXL writes from a
prefill agent into a decode agent's registered pool (`kv_nixl.py`; two real UCX agents in this process)."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from triton_vlm.engine import kv_wire
from triton_vlm.engine.kv_handoff import PrefilledKV
from triton_vlm.engine.kv_nixl import NixlTransport


def handoff(dtype=torch.float32, tokens=5, seeded=False) -> PrefilledKV:
    keys, values = torch.randn(2, tokens, 2, 8).to(dtype), torch.randn(2, tokens, 2, 8).to(dtype)
    state = torch.Generator().manual_seed(3).get_state() if seeded else None
    return PrefilledKV(keys, values, first_token=42, delta=-7, generator_state=state, start=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_handoff_comes_back_from_its_bytes_and_header_as_it_was(dtype):
    kv = handoff(dtype, seeded=True)
    raw, header = kv_wire.pack(kv, agent="a")
    assert raw.nbytes == 2 * kv.keys.numel() * kv.keys.element_size() and json.loads(header)["agent"] == "a"
    back = kv_wire.unpack(raw, header)
    assert back.keys.dtype == dtype and torch.equal(back.keys, kv.keys) and torch.equal(back.values, kv.values)
    assert (back.first_token, back.delta, back.start, back.num_tokens) == (42, -7, 16, 21)
    assert torch.equal(back.generator_state, kv.generator_state)


@pytest.fixture(scope="module")
def agents():
    return NixlTransport(receive_bytes=4096), NixlTransport()  # decode, prefill


def test_nixl_writes_the_kv_into_the_decode_servers_pool(agents):
    decode, prefill = agents
    kv = handoff()
    raw, header = kv_wire.pack(kv)
    first = decode.inbox(raw.nbytes, with_metadata=True)
    prefill.write(torch.from_numpy(raw), first.target)
    back = kv_wire.unpack(first.wait(prefill.name, 10).numpy(), header)
    first.close(written=True)
    assert torch.equal(back.keys, kv.keys) and torch.equal(back.values, kv.values) and back.first_token == 42
    again = decode.inbox(raw.nbytes, with_metadata=False)  # the metadata went once
    assert again.offset == first.offset, "the region came back"
    prefill.write(torch.from_numpy(raw), again.target)
    assert torch.equal(again.wait(prefill.name, 10), torch.from_numpy(raw))
    again.close(written=True)


def test_idle_agents_take_no_cpu(agents):
    """NIXL's own progress thread spun a core in every server that had an agent, serving or not."""
    before = time.process_time()
    time.sleep(1.0)
    assert time.process_time() - before < 0.2  # a spinning thread: about 1 s


def test_a_full_pool_says_so_and_regions_come_back_whole(agents):
    decode, _ = agents
    a, b = decode.inbox(2048, False), decode.inbox(2048, False)
    assert decode.inbox(1, False) is None
    a.close(written=True)
    assert decode.inbox(4096, False) is None, "b still holds its half"
    b.close(written=True)
    whole = decode.inbox(4096, False)
    assert whole is not None
    whole.close(written=True)


def test_a_region_whose_transfer_failed_is_never_handed_out_again():
    """A prefill server that timed out may still write later: that region must not hold another prompt's KV."""
    decode = NixlTransport(receive_bytes=1024)
    failed = decode.inbox(1024, False)
    failed.close(written=False)
    assert decode.inbox(1, False) is None


def test_a_write_for_another_size_or_an_unknown_agent_fails_clearly(agents):
    decode, prefill = agents
    inbox = decode.inbox(64, with_metadata=False)
    with pytest.raises(RuntimeError, match="the KV is 32 bytes; the decode server's buffer takes 64"):
        prefill.write(torch.zeros(32, dtype=torch.uint8), inbox.target)
    stranger = NixlTransport(receive_bytes=64)
    with pytest.raises(RuntimeError, match=f"NIXL agent {stranger.name} is unknown here"):
        prefill.write(torch.zeros(64, dtype=torch.uint8), stranger.inbox(64, with_metadata=False).target)
    inbox.close(written=True)


def test_a_nixl_that_cannot_start_fails_at_start_saying_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "nixl_cu12._api", None)  # as if nixl-cu12 were not installed
    with pytest.raises(RuntimeError, match="kv_transport nixl: NIXL could not start its UCX agent .*install nixl-cu12 "
                                           "or serve with kv_transport grpc"):
        NixlTransport()
