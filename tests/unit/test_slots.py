"""The KV-cache slot ledger: lowest free slot first, counts that other threads read, and a clear failure
when none is free (the scheduler admits only while `free`)."""

from __future__ import annotations

import pytest

from triton_vlm.engine.slots import SlotLedger


def test_slots_are_taken_lowest_first_and_counted():
    ledger = SlotLedger(3)
    assert [ledger.take(), ledger.take()] == [0, 1]
    ledger.cached(1, 40)
    assert (ledger.free, ledger.held, ledger.tokens) == (1, 2, 40)
    ledger.release(0)
    assert ledger.take() == 0 and ledger.take() == 2
    with pytest.raises(RuntimeError, match="no free KV-cache slot"):
        ledger.take()
    for slot in range(3):
        ledger.release(slot)
    ledger.cached(1, 5)  # a released slot holds nothing
    assert (ledger.free, ledger.held, ledger.tokens) == (3, 0, 0)
