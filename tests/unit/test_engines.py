"""The three engines, in-process without Triton, against transformers' own generate."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from tests.conftest import make_image
from tests.reference import reference_generate
from triton_vlm.config import EncoderConfig, LanguageConfig, PreprocessConfig
from triton_vlm.encode.encoder import VisionEncoder
from triton_vlm.engine.language import LanguageEngine, LanguageRequest
from triton_vlm.errors import InvalidRequest
from triton_vlm.preprocess.stage import Preprocessor
from triton_vlm.protocol import GenerateRequest, SamplingParams


@pytest.fixture(scope="module")
def engines(tiny_model):
    pre = Preprocessor(PreprocessConfig(model_path=tiny_model))
    enc = VisionEncoder(EncoderConfig(model_path=tiny_model))
    lm = LanguageEngine(LanguageConfig(model_path=tiny_model))
    yield pre, enc, lm
    lm.shutdown()


def run_pipeline(engines, prompt, images, **sampling):
    pre, enc, lm = engines
    p = pre(GenerateRequest(text_input=prompt, images=images, sampling=SamplingParams(**sampling)))
    embeds = enc.encode(p.pixel_values, p.image_grid_thw)
    outs = list(lm.generate(LanguageRequest("r", p.input_ids, embeds, p.image_grid_thw, p.sampling)))
    return [t for o in outs for t in o.token_ids], "".join(o.text for o in outs), outs[-1]


@pytest.mark.parametrize("sizes", [[], [(640, 480)], [(300, 200), (800, 600)]])
def test_greedy_ids_match_transformers_generate(engines, tiny_model, sizes):
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    ids, _, last = run_pipeline(engines, "describe the picture", images, max_tokens=12)
    assert ids == reference_generate(tiny_model, "describe the picture", images, 12)
    assert last.finish_reason in ("stop", "length")


def test_image_placeholders_expand_to_one_token_per_merged_patch(engines):
    pre = engines[0]
    p = pre(GenerateRequest(text_input="hi", images=[make_image(640, 480)]))
    grid = p.image_grid_thw[0]
    assert (p.input_ids == pre.family.image_token_id).sum() == grid.prod() // 4
    assert p.pixel_values.shape == (grid.prod(), 1176)


def test_encoder_embeds_one_row_per_image_token(engines):
    pre, enc, _ = engines
    p = pre(GenerateRequest(text_input="hi", images=[make_image(300, 200), make_image(200, 300, 1)]))
    embeds = enc.encode(p.pixel_values, p.image_grid_thw)
    assert embeds.shape == ((p.input_ids == pre.family.image_token_id).sum(), pre.family.hidden_size)
    assert torch.isfinite(embeds).all()


def test_streamed_text_is_the_decoded_ids(engines):
    ids, text, last = run_pipeline(engines, "what is this", [], max_tokens=10)
    tokenizer = engines[2].tokenizer
    assert text == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert len(ids) <= 10 and (last.finish_reason == "length") == (len(ids) == 10)


def test_seed_makes_sampling_reproducible(engines):
    a = run_pipeline(engines, "tell a story", [], max_tokens=8, temperature=1.0, seed=7)[0]
    b = run_pipeline(engines, "tell a story", [], max_tokens=8, temperature=1.0, seed=7)[0]
    c = run_pipeline(engines, "tell a story", [], max_tokens=8, temperature=1.0, seed=8)[0]
    assert a == b and a != c


def test_too_long_prompt_is_refused_with_its_length(engines):
    pre = engines[0]
    with pytest.raises(InvalidRequest, match="model context is 4096"):
        pre(GenerateRequest(text_input="red " * 5000))


def test_an_empty_prompt_is_refused_and_the_next_request_served(engines):
    lm = engines[2]
    empty = LanguageRequest("empty", np.zeros(0, np.int64), torch.zeros((0, lm.family.hidden_size)), np.zeros((0, 3)))
    out = list(lm.generate(empty))
    assert len(out) == 1 and out[0].finish_reason == "error" and "the prompt is empty" in str(out[0].error)
    assert run_pipeline(engines, "hi", [], max_tokens=2)[2].finished


def test_mismatched_embeddings_end_only_that_request(engines):
    pre, enc, lm = engines
    p = pre(GenerateRequest(text_input="hi", images=[make_image(300, 200)]))
    bad = LanguageRequest("bad", p.input_ids, torch.zeros((3, pre.family.hidden_size)), p.image_grid_thw)
    out = list(lm.generate(bad))
    assert out[-1].finish_reason == "error" and "image embeddings" in str(out[-1].error)
    assert run_pipeline(engines, "hi", [], max_tokens=2)[2].finished


def test_cancel_stops_the_request_and_frees_its_kv_blocks(engines):
    pre, _, lm = engines
    p = pre(GenerateRequest(text_input="go on", sampling=SamplingParams(max_tokens=3000)))
    req = LanguageRequest("long", p.input_ids, torch.zeros((0, pre.family.hidden_size)), p.image_grid_thw,
                          SamplingParams(max_tokens=3000, ignore_eos=True))
    outs, done, held = [], threading.Event(), []

    def on_step(out):
        outs.append(out)
        if len(outs) == 3:
            held.append(lm.stats().blocks_in_use)
            handle.cancel()
        if out.finished:
            done.set()

    handle = lm.submit(req, on_step)
    assert done.wait(60)
    assert outs[-1].finish_reason == "cancelled" and len(outs) < 100
    assert held[0] > 0 and lm.stats().blocks_in_use == 0
    assert np.all([o.error is None for o in outs])
