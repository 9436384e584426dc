"""The language engine as a serving engine, in-process: continuous batching, admission control, stop
strings, chunked prefill over paged blocks, and tensor parallelism over gloo against one rank."""

from __future__ import annotations

import hashlib
import subprocess
import threading

import numpy as np
import pytest
import torch

from tests.conftest import make_image, wait_until
from triton_vlm.config import EncoderConfig, LanguageConfig, PreprocessConfig
from triton_vlm.encode.encoder import VisionEncoder
from triton_vlm.engine.language import LanguageEngine, LanguageRequest
from triton_vlm.engine.sequence import Sequence
from triton_vlm.preprocess.stage import Preprocessor
from triton_vlm.protocol import GenerateRequest, SamplingParams

PROMPTS = ["hi", "describe the picture in detail", "what color is the sky", "one two three four five six",
           "is there a cat", "compare both images please and say which is larger", "the road", "why"]


@pytest.fixture(scope="module")
def parts(tiny_model):
    return Preprocessor(PreprocessConfig(model_path=tiny_model)), VisionEncoder(EncoderConfig(model_path=tiny_model))


def make_request(parts, i, prompt, n_images=0, images=None, keyed=False, **sampling):
    """Request "r{i}": `prompt` with `images` (else `n_images` made from `i`), preprocessed and encoded;
    `keyed`: with the images' content keys (their blocks can then be prefix-cached)."""
    pre, enc = parts
    if images is None:
        images = [make_image(120 + 40 * j, 90 + 30 * j, seed=i * 10 + j) for j in range(n_images)]
    p = pre(GenerateRequest(text_input=prompt, images=images, sampling=SamplingParams(**sampling)))
    keys = tuple(hashlib.sha256(image).digest() for image in images) if keyed else ()
    return LanguageRequest(f"r{i}", p.input_ids, enc.encode(p.pixel_values, p.image_grid_thw), p.image_grid_thw,
                           p.sampling, image_keys=keys)


def run_concurrently(engine, requests):
    """Submit all at once; -> each request's (ids, text, last output)."""
    results, done = {}, threading.Semaphore(0)

    def collector(rid):
        outs = []

        def on_step(out):
            outs.append(out)
            if out.finished:
                results[rid] = ([t for o in outs for t in o.token_ids], "".join(o.text for o in outs), out)
                done.release()
        return on_step

    for r in requests:
        engine.submit(r, collector(r.request_id))
    for _ in requests:
        assert done.acquire(timeout=120)
    return [results[r.request_id] for r in requests]


@pytest.fixture(scope="module")
def engine(tiny_model):
    lm = LanguageEngine(LanguageConfig(model_path=tiny_model))
    yield lm
    lm.shutdown()


def test_batched_decoding_equals_one_at_a_time(parts, engine):
    requests = [make_request(parts, i, p, n_images=i % 3, max_tokens=12 + i) for i, p in enumerate(PROMPTS)]
    alone = [run_concurrently(engine, [r])[0][0] for r in requests]
    together = run_concurrently(engine, requests)
    assert [ids for ids, _, _ in together] == alone
    assert engine.peak_batch >= 4, "the requests were not decoded together"
    assert engine.stats().blocks_in_use == 0 and engine.stats().running == 0


def test_stats_count_prefill_and_decode_tokens_and_the_waiting(parts, tiny_model):
    small = LanguageEngine(LanguageConfig(model_path=tiny_model, max_num_seqs=1))
    try:
        requests = [make_request(parts, i, p, max_tokens=8, ignore_eos=True) for i, p in enumerate(PROMPTS[:3])]
        seen = []
        small.submit(requests[0], lambda out: seen.append(small.stats()))  # on the engine thread, mid-run
        results = run_concurrently(small, requests[1:])
        stats = small.stats()
        assert stats.prefix_queries == sum(len(r.input_ids) for r in requests)
        assert stats.prefill_tokens == stats.prefix_queries - stats.prefix_hits  # hits are not computed
        assert stats.prefix_hits > 0  # the chat template's system prompt, the same in each
        assert stats.decode_tokens == sum(len(ids) - 1 for ids, _, _ in results) + 7
        assert (stats.running, stats.waiting, stats.blocks_in_use) == (0, 0, 0)
        assert max(s.waiting for s in seen) >= 1 and max(s.running for s in seen) == 1, "one at a time, a queue"
    finally:
        small.shutdown()


def test_full_cache_queues_requests_instead_of_failing(parts, tiny_model):
    small = LanguageEngine(LanguageConfig(model_path=tiny_model, max_num_seqs=2))
    try:
        requests = [make_request(parts, i, p, max_tokens=6) for i, p in enumerate(PROMPTS[:5])]
        results = run_concurrently(small, requests)
        assert all(last.finish_reason in ("stop", "length") for _, _, last in results)
        assert small.peak_batch == 2
    finally:
        small.shutdown()


def test_seeds_reproduce_and_differ_in_a_batch(parts, engine):
    def sampled(seed):
        return make_request(parts, seed, "tell a story", max_tokens=10, temperature=1.0, seed=seed)

    a, b, c = run_concurrently(engine, [sampled(1), sampled(1), sampled(2)])
    assert a[0] == b[0] and a[0] != c[0]


def test_stop_string_ends_the_output_before_it(parts, engine):
    [(ids, text, last)] = run_concurrently(engine, [make_request(parts, 0, "describe the picture", max_tokens=24)])
    assert len(text) > 6, text
    stop = text[3:6]
    [(ids2, text2, last2)] = run_concurrently(engine, [make_request(parts, 0, "describe the picture", max_tokens=24,
                                                                    stop=(stop,))])
    assert text2 == text[:text.index(stop)] and last2.finish_reason == "stop"
    assert ids2 == ids[:len(ids2)] and len(ids2) < len(ids)


@pytest.fixture(scope="module")
def tp2(tiny_model):
    lm = LanguageEngine(LanguageConfig(model_path=tiny_model, tensor_parallel=2))
    yield lm
    lm.shutdown()


def _sequence(engine, request, table) -> Sequence:
    """The request as the engine's sequence, holding the blocks of `table` (whatever they hold now)."""
    seq = Sequence(request, lambda out: None, engine.family, engine.tokenizer, engine.block_size,
                   engine.max_model_len)
    seq.block_table = list(table)
    return seq


def _prefill(engine, seq, n=None):
    """Logits [V] of the sequence's next n tokens (all of them by default), computed into its blocks."""
    n = seq.num_tokens - seq.num_computed if n is None else n
    logits = engine.runner.prefill([engine.runner.chunk(seq, n)])[0]
    seq.num_computed += n
    return logits


def test_two_ranks_give_the_same_logits_and_ids_as_one(parts, engine, tp2):
    requests = [make_request(parts, 0, "what is this"), make_request(parts, 1, "compare them", n_images=2)]
    one = run_concurrently(engine, requests)
    two = run_concurrently(tp2, requests)
    assert [r[0] for r in one] == [r[0] for r in two]
    # prefill logits of the multi-image prompt, rank 0 of each, into blocks no sequence holds (both idle)
    logits = []
    for lm in (engine, tp2):
        assert lm.stats().blocks_in_use == 0
        logits.append(_prefill(lm, _sequence(lm, requests[1], range(lm.num_blocks - 20, lm.num_blocks))))
    np.testing.assert_allclose(logits[1].numpy(), logits[0].numpy(), rtol=1e-4, atol=1e-5)


def test_prompts_prefilled_together_equal_each_alone(parts, engine):
    """One forward for several prompts (projections over all tokens, attention per prompt) gives each
    prompt the logits and cache contents it gets alone."""
    requests = [make_request(parts, i, p, n_images=i % 2) for i, p in enumerate(PROMPTS[:3])]
    assert engine.stats().blocks_in_use == 0
    runner, top = engine.runner, engine.num_blocks
    alone, together = [], []
    for i, request in enumerate(requests):
        seq = _sequence(engine, request, range(top - 10 * (i + 1), top - 10 * i))
        alone.append((_prefill(engine, seq), seq))
        together.append(_sequence(engine, request, range(top - 60 + 10 * i, top - 50 + 10 * i)))
    logits = runner.prefill([runner.chunk(seq, seq.num_tokens) for seq in together])
    bs = engine.block_size
    for i, (row, seq) in enumerate(alone):
        torch.testing.assert_close(logits[i], row, rtol=1e-4, atol=1e-5)
        slots = [b * bs + k for b in seq.block_table for k in range(bs)][:seq.num_tokens]
        slots_together = [b * bs + k for b in together[i].block_table for k in range(bs)][:seq.num_tokens]
        torch.testing.assert_close(runner.cache.k[:, slots_together], runner.cache.k[:, slots], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cuts", [[40], [3, 38, 70], [50, 51]])
def test_a_prompt_prefilled_in_chunks_equals_it_whole(parts, engine, cuts):
    """Chunks that end anywhere, inside an image's placeholders too, over blocks that are not in a row, give
    the logits of the whole prompt; and the next decode step agrees as well."""
    request = make_request(parts, 3, "compare both images please", n_images=2)
    top = engine.num_blocks
    whole = _sequence(engine, request, range(top - 10, top))
    image_at = whole.image_at
    assert any(image_at[0] < cut <= image_at[-1] for cut in cuts), "a chunk should end inside the images"
    expected = _prefill(engine, whole)
    chunked = _sequence(engine, request, [top - 11 - 2 * i for i in range(10)])  # scattered, descending
    for start, end in zip([0, *cuts], [*cuts, chunked.num_tokens], strict=True):
        got = _prefill(engine, chunked, end - start)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    token = int(expected.argmax())
    decoded = [engine.runner.decode([token], [seq.num_tokens + seq.delta], [seq.block_table], [seq.num_tokens])[0]
               for seq in (whole, chunked)]
    torch.testing.assert_close(decoded[1], decoded[0], rtol=1e-4, atol=1e-5)


def test_a_rank_holds_only_its_shard(tp2, engine):
    one = engine.runner.model.model.layers[0]
    two = tp2.runner.model.model.layers[0]
    assert two.self_attn.q_proj.weight.shape[0] * 2 == one.self_attn.q_proj.weight.shape[0]
    assert two.mlp.down_proj.weight.shape[1] * 2 == one.mlp.down_proj.weight.shape[1]


def test_tp_workers_exit_with_the_engine(tp2):  # last: it shuts the shared TP engine down
    workers = list(tp2._workers)
    assert workers and all(w.poll() is None for w in workers)
    tp2.shutdown()
    assert all(w.poll() is not None for w in workers)
    out = subprocess.run(["pgrep", "-f", "triton_vlm.engine.tp_worker"], capture_output=True, text=True)
    assert str(workers[0].pid) not in out.stdout.split()


def _solo_ids(engine, requests):
    return [run_concurrently(engine, [r])[0][0] for r in requests]


def test_a_request_whose_client_fails_ends_alone_and_returns_its_slot(parts, engine):
    good = [make_request(parts, i, p, n_images=i % 2, max_tokens=10) for i, p in enumerate(PROMPTS[:4])]
    alone = _solo_ids(engine, good)
    outputs = []

    def failing_client(out):  # e.g. its stream broke: raises on its second token
        outputs.append(out)
        if len(outputs) == 2:
            raise ConnectionError("client gone")

    bad = make_request(parts, 9, "go on and on", max_tokens=50)
    engine.submit(bad, failing_client)
    together = run_concurrently(engine, good)
    assert [ids for ids, _, _ in together] == alone
    assert outputs[-1].finished and sum(o.finished for o in outputs) == 1  # exactly one final output
    assert engine.stats().blocks_in_use == 0 and engine.stats().running == 0


def test_a_failing_prefill_fails_that_request_only(parts, engine, monkeypatch):
    good = [make_request(parts, i, p, max_tokens=8) for i, p in enumerate(PROMPTS[:3])]
    alone = _solo_ids(engine, good)
    bad = make_request(parts, 7, "a prompt the model cannot take, for this test " * 3, max_tokens=8)
    real = engine.runner.chunk

    def chunk(seq, n):
        if seq.request_id == bad.request_id:
            raise RuntimeError("prefill broke on this prompt")
        return real(seq, n)

    monkeypatch.setattr(engine.runner, "chunk", chunk)
    results = run_concurrently(engine, [good[0], bad, *good[1:]])
    assert [ids for ids, _, _ in results[:1] + results[2:]] == alone
    _, _, last = results[1]
    assert last.finish_reason == "error" and "prefill broke" in str(last.error)
    assert engine.stats().blocks_in_use == 0 and engine.stats().running == 0


def test_tiny_and_huge_temperatures_sample_without_failing(parts, engine):
    greedy = make_request(parts, 0, "tell a story", max_tokens=8)
    [(expected, _, _)] = run_concurrently(engine, [greedy])
    odd = [make_request(parts, 10 + k, "tell a story", max_tokens=8, temperature=t, seed=1)  # ids must differ
           for k, t in enumerate((1e-45, 3e38))]
    (tiny, _, tiny_last), (_, _, huge_last) = run_concurrently(engine, odd)
    assert tiny == expected  # below SAMPLING_EPS is greedy
    assert tiny_last.finish_reason in ("stop", "length") and huge_last.finish_reason in ("stop", "length")


def test_min_tokens_and_ignore_eos_hold_off_the_end(parts, engine, monkeypatch):
    """Make EOS a token greedy picks early: the answer ends there, unless min_tokens or ignore_eos say no."""
    [(base, _, _)] = run_concurrently(engine, [make_request(parts, 0, "hi", max_tokens=10, ignore_eos=True)])
    k = next(i for i in range(1, len(base)) if base[i] not in base[:i])
    monkeypatch.setattr(engine, "eos_ids", {base[k]})
    [(stopped, _, last)] = run_concurrently(engine, [make_request(parts, 0, "hi", max_tokens=10)])
    assert stopped == base[:k + 1] and last.finish_reason == "stop"
    [(ignored, _, last)] = run_concurrently(engine, [make_request(parts, 0, "hi", max_tokens=10, ignore_eos=True)])
    assert ignored == base and last.finish_reason == "length"
    [(held, _, _)] = run_concurrently(engine, [make_request(parts, 0, "hi", max_tokens=10, min_tokens=k + 3)])
    assert held[:k] == base[:k] and len(held) >= k + 3 and base[k] not in held[:k + 3]


def test_cancel_ends_a_running_request_and_frees_its_blocks(parts, engine):
    outs, done = [], threading.Event()

    def on_step(out):
        outs.append(out)
        if len(outs) == 1:
            handle.cancel()
        if out.finished:
            done.set()

    handle = engine.submit(make_request(parts, 0, "hi", max_tokens=2000, ignore_eos=True), on_step)
    assert done.wait(60)
    assert outs[-1].finish_reason == "cancelled" and len(outs) < 10
    assert engine.stats().blocks_in_use == 0


def test_running_streams_keep_decoding_while_a_long_prompt_is_prefilled_in_chunks(parts, tiny_model):
    """Asserted where the prompt's arrival at the engine is seen: with a budget of 32 tokens a step and 4
    streams decoding, the L - C tokens of a prompt of L whose first C are cached (the chat template's, from
    the streams' prompts) are prefilled 28 at a time, so the streams produce a token each in every step
    between its arrival and its first token."""
    lm = LanguageEngine(LanguageConfig(model_path=tiny_model, max_num_batched_tokens=32))
    events, lock = [], threading.Lock()

    def record(what):
        def on_step(out):
            with lock:
                events.append((what, len(out.token_ids)))
        return on_step

    try:
        streams = [make_request(parts, 20 + i, "go on", max_tokens=500, ignore_eos=True) for i in range(4)]
        handles = [lm.submit(r, record("stream")) for r in streams]
        pre, enc = parts
        p = pre(GenerateRequest(text_input="compare both pictures", sampling=SamplingParams(max_tokens=2),
                                images=[make_image(320, 240, seed=31), make_image(240, 320, seed=32)]))
        long = LanguageRequest("long", p.input_ids, enc.encode(p.pixel_values, p.image_grid_thw), p.image_grid_thw,
                               p.sampling, p.image_keys)
        wait_until(lambda: sum(n for what, n in events if what == "stream") >= 20, 60, "the streams to decode")
        cached = lm.cached_prefix(long)  # nothing is evicted here: the pool is far from full
        with lock:
            events.append(("arrived", 0))
        lm.submit(long, record("long"))
        wait_until(lambda: any(what == "long" for what, _ in events), 60, "the long prompt's first token")
        with lock:
            arrived = events.index(("arrived", 0))
            first = next(i for i, (what, _) in enumerate(events) if what == "long")
            between = sum(n for what, n in events[arrived:first] if what == "stream")
        chunks = -(-(len(long.input_ids) - cached) // (32 - 4))
        assert chunks >= 5 and between >= 4 * (chunks - 1), (len(long.input_ids), cached, between)
        for handle in handles:
            handle.cancel()
    finally:
        lm.shutdown()
