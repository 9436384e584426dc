"""Retrying a call while its failure is transient (a shard that met a dead encoder replica)."""

from __future__ import annotations

import pytest

from triton_vlm.serving.retry import retry


def _flaky(failures: list[Exception]):
    calls = []

    def call():
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return len(calls)

    return call, calls


def test_transient_failures_are_tried_again_until_it_works():
    call, calls = _flaky([RuntimeError("Stub process 'x_0_1' is not healthy.")] * 3)
    assert retry(call, lambda e: "not healthy" in str(e), first_delay_s=0.001) == 4


def test_other_failures_are_raised_at_once():
    call, calls = _flaky([ValueError("bad image"), RuntimeError("not healthy")])
    with pytest.raises(ValueError, match="bad image"):
        retry(call, lambda e: "not healthy" in str(e), first_delay_s=0.001)
    assert len(calls) == 1


def test_the_last_transient_failure_is_raised_at_the_deadline():
    call, calls = _flaky([RuntimeError("not healthy")] * 1000)
    with pytest.raises(RuntimeError, match="not healthy"):
        retry(call, lambda e: True, deadline_s=0.05, first_delay_s=0.01, max_delay_s=0.01)
    assert 2 <= len(calls) < 20
