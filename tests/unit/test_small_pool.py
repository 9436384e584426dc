"""The language engine with a KV pool too small for all its sequences at once, in-process (these ran
through a server of their own before; the engine needs none): preemption that loses and changes nothing,
long prompts prefilled in chunks while the streams keep decoding, and a prompt that can never fit."""

from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import make_image, wait_until
from tests.unit.test_batching import make_request, parts, run_concurrently  # noqa: F401 (a fixture)
from triton_vlm.config import LanguageConfig
from triton_vlm.engine.language import LanguageEngine


@pytest.fixture(scope="module")
def small_pool(tiny_model):
    """A pool of 128 blocks (2048 tokens: 1 MiB at 512 bytes a token) for up to 16 sequences, and steps of
    at most 32 tokens (long prompts are prefilled in many chunks)."""
    engine = LanguageEngine(LanguageConfig(model_path=tiny_model, kv_cache_mb=1, max_num_seqs=16,
                                           max_num_batched_tokens=32))
    yield engine
    engine.shutdown()


def test_more_sequences_than_the_pool_holds_all_finish_with_their_own_ids(small_pool, parts):  # noqa: F811
    # each needs about 23 blocks (a 192-token image, 150 tokens out): together they need twice the pool
    requests = [make_request(parts, 600 + i, f"story number {i}", images=[make_image(448, 336, seed=600 + i)],
                             max_tokens=150, ignore_eos=True) for i in range(12)]
    alone = [run_concurrently(small_pool, [r])[0][0] for r in requests]
    preempted = small_pool.stats().preemptions
    together = run_concurrently(small_pool, requests)
    assert [ids for ids, _, _ in together] == alone and all(len(ids) == 150 for ids in alone)
    assert all(last.finish_reason == "length" for _, _, last in together)
    stats = small_pool.stats()
    assert stats.preemptions > preempted and stats.blocks_total == 128
    wait_until(lambda: small_pool.stats().blocks_in_use == 0, 30, "the blocks back")


def test_streams_keep_decoding_while_a_long_prompt_is_prefilled_in_chunks(small_pool, parts):  # noqa: F811
    """4 streams decode; a 2-image prompt of L tokens arrives. From its admission (5 running) to its first
    token, each step has room for 28 of its tokens after the 4 decodes, so the streams produce tokens in
    every one of about L / 28 steps (unchunked, it would take one step: no tokens between)."""
    events, lock, started, done = [], threading.Lock(), set(), threading.Semaphore(0)

    def note(what: str) -> None:
        with lock:
            events.append(what)

    def decoding(i):
        def on_step(out):
            if out.token_ids:
                started.add(i)
                note("token")
            if out.finished:
                done.release()
        return on_step

    long = make_request(parts, 800, "compare them", images=[make_image(640, 480, seed=801),
                                                         make_image(480, 640, seed=802)], max_tokens=2)
    streams = [make_request(parts, 900 + i, f"stream {i}", max_tokens=250, ignore_eos=True) for i in range(4)]
    for i, r in enumerate(streams):
        small_pool.submit(r, decoding(i))
    wait_until(lambda: len(started) == 4, 60, "every stream to decode")
    small_pool.submit(long, lambda out: (note("first") if out.token_ids and "first" not in events else None,
                                         out.finished and done.release()))
    while "first" not in events:
        if "admitted" not in events and small_pool.stats().running >= 5:
            note("admitted")
        time.sleep(0.001)
    for _ in range(5):
        assert done.acquire(timeout=120)
    with lock:
        between = events[events.index("admitted"):events.index("first")].count("token")
    steps = len(long.input_ids) // 28
    assert steps >= 20 and between >= 4 * (steps // 2), (len(long.input_ids), between)


def test_a_prompt_larger_than_the_pool_is_refused_and_the_next_one_served(small_pool, parts):  # noqa: F811
    [(_, _, refused)] = run_concurrently(small_pool, [make_request(parts, 1, "red " * 2500, max_tokens=4)])
    assert refused.finish_reason == "error" and "the KV cache holds 2048 tokens" in str(refused.error)
    [(ids, _, last)] = run_concurrently(small_pool, [make_request(parts, 2, "hi", max_tokens=4)])
    assert ids and last.finish_reason in ("stop", "length")
