"""The language engine in a process of its own (`serving/engine_process.py`), without Triton: transformers'
ids through it, and a process that dies ends each request it had once, with an error, at once; then a
new engine serves."""

from __future__ import annotations

import os
import queue
import signal
import time

import pytest

from tests.conftest import make_image, wait_until
from tests.reference import reference_generate
from triton_vlm.config import EncoderConfig, LanguageConfig, PreprocessConfig
from triton_vlm.encode.encoder import VisionEncoder
from triton_vlm.engine.language import LanguageRequest
from triton_vlm.errors import Unavailable
from triton_vlm.preprocess.stage import Preprocessor
from triton_vlm.protocol import GenerateRequest, SamplingParams
from triton_vlm.serving.engine_process import EngineProcess


@pytest.fixture(scope="module")
def engine(tiny_model):
    engine = EngineProcess(LanguageConfig(model_path=tiny_model))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def prepare(tiny_model):
    pre = Preprocessor(PreprocessConfig(model_path=tiny_model))
    enc = VisionEncoder(EncoderConfig(model_path=tiny_model))

    def prepare(prompt: str, images: list[bytes], **sampling) -> LanguageRequest:
        p = pre(GenerateRequest(text_input=prompt, images=images, sampling=SamplingParams(**sampling)))
        return LanguageRequest(prompt, p.input_ids, enc.encode(p.pixel_values, p.image_grid_thw), p.image_grid_thw,
                               p.sampling, p.image_keys)

    return prepare


def _submit(engine: EngineProcess, request: LanguageRequest) -> queue.Queue:
    outputs: queue.Queue = queue.Queue()
    engine.submit(request, outputs.put)
    return outputs


def _until_finished(outputs: queue.Queue, timeout_s: float = 60) -> list:
    got = [outputs.get(timeout=timeout_s)]
    while not got[-1].finished:
        got.append(outputs.get(timeout=timeout_s))
    return got


def test_ids_through_the_engine_process_equal_transformers_and_its_cache_is_asked_there(engine, prepare, tiny_model):
    images = [make_image(300, 200), make_image(200, 300, seed=1)]
    request = prepare("describe the pictures", images, max_tokens=12)
    outputs = _until_finished(_submit(engine, request))
    assert [t for o in outputs for t in o.token_ids] == reference_generate(tiny_model, "describe the pictures",
                                                                           images, 12)
    assert outputs[-1].finish_reason in ("stop", "length")
    full_blocks = len(request.input_ids) // engine.block_size * engine.block_size
    assert full_blocks > 0 and engine.cached_prefix(request) == full_blocks
    assert engine.stats().prefill_tokens >= len(request.input_ids)


def test_a_killed_engine_ends_each_request_once_with_an_error_and_a_new_one_serves(engine, prepare):
    short = prepare("hello", [], max_tokens=6)
    expected = [t for o in _until_finished(_submit(engine, short)) for t in o.token_ids]
    long = [_submit(engine, prepare(f"story {i}", [make_image(64, 64, seed=i)] if i % 2 else [], max_tokens=3000,
                                    ignore_eos=True)) for i in range(5)]
    firsts = [outputs.get(timeout=60) for outputs in long]  # every request is generating
    victim, counted = engine.process.pid, engine.stats()
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    for first, outputs in zip(firsts, long, strict=True):
        end = _until_finished(outputs, timeout_s=10)[-1] if not first.finished else first
        assert end.finish_reason == "error" and isinstance(end.error, Unavailable)
        assert "language engine process died (signal SIGKILL)" in str(end.error)
    assert time.monotonic() - killed < 10
    meanwhile = _until_finished(_submit(engine, short))  # "restarting", or served by the new engine: one end
    assert meanwhile[-1].finish_reason == "error" or [t for o in meanwhile for t in o.token_ids] == expected
    wait_until(lambda: engine.restarts == 1, timeout_s=120, what="a new engine")
    assert engine.process.pid != victim
    assert [t for o in _until_finished(_submit(engine, short)) for t in o.token_ids] == expected
    time.sleep(0.5)
    assert all(outputs.empty() for outputs in long), "an output came after a request's end"
    now = engine.stats()  # Triton's counters only go up: the dead engine's counts stay in
    assert now.prefill_tokens > counted.prefill_tokens and now.decode_tokens > counted.decode_tokens
    assert now.running == now.waiting == now.blocks_in_use == 0


def test_shutdown_ends_every_request_and_the_process(tiny_model, prepare):
    engine = EngineProcess(LanguageConfig(model_path=tiny_model, max_num_seqs=2))
    running = [_submit(engine, prepare(f"story {i}", [], max_tokens=3000, ignore_eos=True)) for i in range(4)]
    running[0].get(timeout=60)
    engine.shutdown()
    ends = [_until_finished(outputs, timeout_s=10)[-1] for outputs in running]
    assert {end.finish_reason for end in ends} <= {"cancelled", "error"} and len(ends) == 4
    assert engine.process.poll() is not None
