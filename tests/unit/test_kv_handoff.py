"""Prefill/decode disaggregation's core, in-process: one engine prefills and hands the prompt's KV over,
another decodes from it. Greedy ids equal transformers' own `generate`, seeded sampling equals one engine's,
the decode engine writes only what its own prefix cache lacks, and bad hand-offs fail their request only."""

from __future__ import annotations

import dataclasses
import queue

import pytest

from tests.conftest import make_image
from tests.reference import reference_generate
from tests.unit.test_batching import make_request
from triton_vlm.config import EncoderConfig, LanguageConfig, PreprocessConfig
from triton_vlm.encode.encoder import VisionEncoder
from triton_vlm.engine.language import LanguageEngine, LanguageRequest
from triton_vlm.engine.prefill_router import PrefillRouter
from triton_vlm.errors import InvalidRequest
from triton_vlm.preprocess.stage import Preprocessor

PROMPT = "Describe the pictures."


@pytest.fixture(scope="module")
def parts(tiny_model):
    """Preprocess and encode, a prefill engine, and a decode engine with another block size."""
    prefill = LanguageEngine(LanguageConfig(model_path=tiny_model))
    decode = LanguageEngine(LanguageConfig(model_path=tiny_model, block_size=32))
    yield Preprocessor(PreprocessConfig(model_path=tiny_model)), VisionEncoder(EncoderConfig(model_path=tiny_model)), \
        prefill, decode
    prefill.shutdown()
    decode.shutdown()


def request(parts, images, **sampling) -> LanguageRequest:
    return make_request(parts[:2], 0, PROMPT, images=images, keyed=True, **sampling)


def run(engine, req) -> tuple[list[int], list]:
    outs = list(engine.generate(req))
    return [t for o in outs for t in o.token_ids], outs


def disaggregated(parts, req, prefill=None, decode=None) -> tuple[list[int], object]:
    """-> (the decode engine's ids, the hand-off); the module's engines unless others are given."""
    _, outs = run(prefill or parts[2], dataclasses.replace(req, prefill_only=True))
    assert [o.finish_reason for o in outs] == ["prefilled"]
    handoff = outs[0].handoff
    ids, _ = run(decode or parts[3], dataclasses.replace(req, prefilled=handoff))
    assert ids[0] == handoff.first_token
    return ids, handoff


@pytest.mark.parametrize("sizes", [[], [(640, 480)], [(300, 200), (800, 600), (200, 500), (640, 480)]])
def test_decoding_from_a_handoff_gives_transformers_ids(parts, tiny_model, sizes):
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    req = request(parts, images, max_tokens=12)
    ids, handoff = disaggregated(parts, req)
    assert ids == reference_generate(tiny_model, PROMPT, images, 12)
    assert handoff.num_tokens == len(req.input_ids)


def test_seeded_sampling_continues_as_on_one_engine(parts):
    req = request(parts, [make_image(200, 150, seed=5)], max_tokens=10, temperature=1.0, seed=11, ignore_eos=True)
    one, _ = run(parts[2], req)
    assert disaggregated(parts, req)[0] == one


def test_the_decode_engine_writes_only_what_its_prefix_cache_lacks(parts):
    images = [make_image(320, 240, seed=21)]
    req = request(parts, images, max_tokens=4, ignore_eos=True)
    decode, prompt, answers = parts[3], len(req.input_ids), []
    for expected_hit in (None, (prompt - 1) // 32 * 32):  # the second time, all whole blocks but the last token's
        before = decode.stats()
        answers.append(disaggregated(parts, req)[0])
        hit = decode.stats().prefix_hits - before.prefix_hits
        assert decode.stats().imported_tokens - before.imported_tokens == prompt - hit
        assert expected_hit is None or hit == expected_hit > 0
    assert answers[0] == answers[1]


def test_a_decode_engine_is_sent_only_the_kv_its_prefix_cache_lacks(parts, tiny_model):
    images = [make_image(360, 240, seed=41)]
    req = request(parts, images, max_tokens=8)
    decode, whole_blocks = parts[3], (len(req.input_ids) - 1) // 32 * 32  # the decode engine's blocks are 32 tokens
    assert decode.cached_prefix(req) < whole_blocks  # the chat template's first tokens may be cached
    first, _ = disaggregated(parts, req)
    kv_from = decode.cached_prefix(req)
    assert kv_from == whole_blocks
    before = decode.stats()
    second, handoff = disaggregated(parts, dataclasses.replace(req, kv_from=kv_from))
    assert handoff.start == kv_from and handoff.keys.shape[1] == len(req.input_ids) - kv_from
    assert decode.stats().imported_tokens - before.imported_tokens == len(req.input_ids) - kv_from
    assert first == second == reference_generate(tiny_model, PROMPT, images, 8)


def test_a_handoff_whose_left_out_prefix_is_not_cached_is_prefilled_here(parts, tiny_model):
    """The decode engine asked for the KV past a prefix it had, and lost it (evicted) before the hand-off came."""
    images = [make_image(240, 360, seed=42)]
    req = request(parts, images, max_tokens=8)
    prompt = len(req.input_ids)
    _, outs = run(parts[2], dataclasses.replace(req, prefill_only=True, kv_from=prompt - 5))
    before = parts[3].stats()
    ids, _ = run(parts[3], dataclasses.replace(req, prefilled=outs[0].handoff))
    assert ids == reference_generate(tiny_model, PROMPT, images, 8)
    after = parts[3].stats()
    assert after.imported_tokens == before.imported_tokens
    assert after.prefill_tokens - before.prefill_tokens == prompt - (after.prefix_hits - before.prefix_hits)


def test_a_handoff_of_another_prompt_is_refused_and_the_next_request_served(parts):
    req = request(parts, [], max_tokens=4)
    _, outs = run(parts[2], dataclasses.replace(req, prefill_only=True))
    other = request(parts, [make_image(64, 64, seed=3)], max_tokens=4)
    _, refused = run(parts[3], dataclasses.replace(other, prefilled=outs[0].handoff))
    assert refused[-1].finish_reason == "error" and "handed-off KV" in str(refused[-1].error)
    ids, _ = run(parts[3], req)
    assert ids


@pytest.fixture(scope="module")
def tp2(tiny_model):
    engine = LanguageEngine(LanguageConfig(model_path=tiny_model, tensor_parallel=2))
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("direction", ["tp2 -> tp1", "tp1 -> tp2"])
def test_the_handoff_carries_every_head_whatever_the_ranks_on_either_side(parts, tp2, tiny_model, direction):
    """Each rank holds a slice of the heads: a TP 2 prefill engine gathers them, a TP 2 decode engine gives
    each rank its slice; the ids are still transformers'."""
    images = [make_image(300, 200, seed=31), make_image(200, 300, seed=32)]
    req = request(parts, images, max_tokens=10)
    engines = dict(prefill=tp2) if direction == "tp2 -> tp1" else dict(decode=tp2)
    ids, handoff = disaggregated(parts, req, **engines)
    assert handoff.keys.shape[2] == 2  # the tiny model's kv heads, all of them
    assert ids == reference_generate(tiny_model, PROMPT, images, 10)


class InProcessPrefill:
    """A prefill server's part, in-process: the prefill engine's hand-off (or `fail`, raised)."""

    def __init__(self, engine, fail: Exception | None = None) -> None:
        self.engine, self.fail, self.calls = engine, fail, []

    def __call__(self, request, kv_from):
        self.calls.append((len(request.input_ids), kv_from))
        if self.fail is not None:
            raise self.fail
        _, outs = run(self.engine, dataclasses.replace(request, prefill_only=True, kv_from=kv_from))
        return outs[0].handoff


def routed(parts, remote, req, local_below=0) -> tuple[list[int], list[str], list]:
    """-> (ids, where the router said it prefilled, the outputs) of `req` through a PrefillRouter."""
    outputs, routes = queue.Queue(), []
    router = PrefillRouter(parts[3], remote, local_below, on_route=routes.append)
    router.submit(req, outputs.put, lambda handle: None)
    outs = [outputs.get(timeout=60)]
    while not outs[-1].finished:
        outs.append(outputs.get(timeout=60))
    router.shutdown()
    return [t for o in outs for t in o.token_ids], routes, outs


def test_the_router_prefills_long_prompts_remotely_from_what_the_decode_engine_lacks(parts, tiny_model):
    images = [make_image(300, 300, seed=51)]
    req, remote = request(parts, images, max_tokens=8), InProcessPrefill(parts[2])
    cached = parts[3].cached_prefix(req)  # the chat template's first tokens, from earlier tests
    ids, routes, _ = routed(parts, remote, req, local_below=64)
    assert ids == reference_generate(tiny_model, PROMPT, images, 8) and routes == ["remote"]
    assert remote.calls == [(len(req.input_ids), cached)]
    text_only = request(parts, [], max_tokens=8)  # its uncached rest is short: prefilled on the decode engine
    ids, routes, _ = routed(parts, remote, text_only, local_below=64)
    assert routes == ["local"] and len(remote.calls) == 1 and ids == reference_generate(tiny_model, PROMPT, [], 8)


def test_when_the_prefill_servers_fail_the_decode_engine_prefills(parts, tiny_model):
    images = [make_image(310, 200, seed=52)]
    ids, routes, _ = routed(parts, InProcessPrefill(parts[2], fail=RuntimeError("connection refused")),
                            request(parts, images, max_tokens=8))
    assert routes == ["local"] and ids == reference_generate(tiny_model, PROMPT, images, 8)


def test_a_request_a_prefill_server_calls_invalid_ends_with_that_error(parts):
    _, routes, outs = routed(parts, InProcessPrefill(parts[2], fail=InvalidRequest("image 0 is bad")),
                             request(parts, [make_image(64, 64, seed=53)], max_tokens=8))
    assert routes == [] and [o.finish_reason for o in outs] == ["error"] and str(outs[0].error) == "image 0 is bad"
