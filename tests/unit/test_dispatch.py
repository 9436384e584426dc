"""The encode stage without Triton: sharded encoding equals unsharded, shards follow the balancer,
and neither concurrent requests nor the shards of one request wait for each other."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from tests.conftest import make_image
from triton_vlm.config import EncoderConfig, PreprocessConfig
from triton_vlm.encode.balance import balance
from triton_vlm.encode.dispatch import ShardedEncode, even
from triton_vlm.encode.encoder import VisionEncoder
from triton_vlm.errors import InvalidRequest
from triton_vlm.preprocess.image_inputs import Images
from triton_vlm.preprocess.stage import Preprocessor
from triton_vlm.protocol import GenerateRequest

SIZES = [(640, 480), (300, 200), (1280, 720), (100, 100)]


@pytest.fixture(scope="module")
def parts(tiny_model):
    return Preprocessor(PreprocessConfig(model_path=tiny_model)), VisionEncoder(EncoderConfig(model_path=tiny_model))


def pixels_and_grid(pre, n):
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES[:n])]
    p = pre(GenerateRequest(text_input="hi", images=images))
    return Images.of(pre.family, p.image_grid_thw, pixel_values=torch.as_tensor(p.pixel_values))


def stage(encoder, shards, run=None, calls=None, on_split=None):
    def run_shard(images, target):
        assert target is None, "local replicas: Triton picks the instance"
        if calls is not None:
            calls.append(images.layout.copy())
        return (run or encoder.encode)(images.pixel_values, images.layout)

    return ShardedEncode(run_shard, even(shards), encoder.family.embedding_width,
                         on_split=on_split)


@pytest.mark.parametrize("n_images", [1, 3, 4])
@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_equals_unsharded_and_follows_the_balancer(parts, n_images, shards):
    pre, encoder = parts
    images = pixels_and_grid(pre, n_images)
    pixels, grid = images.pixel_values, images.layout
    calls, splits = [], []
    sharded = stage(encoder, shards, calls=calls, on_split=splits.append).encode(images)
    whole = encoder.encode(pixels, grid)
    assert sharded.shape == whole.shape
    torch.testing.assert_close(sharded, whole, rtol=0, atol=1e-5)
    expected, _ = balance(images.tokens.tolist(), min(shards, n_images))  # by tokens
    assert sorted(map(np.ndarray.tolist, calls)) == sorted(grid[s].tolist() for s in expected if s)
    assert splits == [len(calls)], "the shards metric hears of each split"


def test_text_only_runs_nothing_and_one_image_runs_unsplit(parts):
    pre, encoder = parts
    calls = []
    s = stage(encoder, 4, calls=calls)
    empty = s.encode(Images.of(encoder.family, np.zeros((0, 3), np.int64), pixel_values=torch.zeros((0, 1176))))
    assert empty.shape == (0, encoder.family.hidden_size) and calls == []
    one = pixels_and_grid(pre, 1)
    s.encode(one)
    assert [c.tolist() for c in calls] == [one.layout.tolist()]


def _submit_all(s, requests, timeout=30):
    results, done = [None] * len(requests), threading.Semaphore(0)

    def reply(i):
        def done_cb(embeds, error):
            results[i] = error if error is not None else embeds
            done.release()
        return done_cb

    for i, images in enumerate(requests):
        s.submit(images, reply(i))
    for _ in requests:
        assert done.acquire(timeout=timeout), "a request never finished"
    return results


def _meet_in_pairs(encoder):
    """A shard runner that returns only once another shard is running too (else the barrier breaks)."""
    barrier = threading.Barrier(2, timeout=10)

    def run(pixels, grid):
        barrier.wait()
        return encoder.encode(pixels, grid)

    return run


def test_concurrent_requests_are_encoded_at_the_same_time(parts):
    """Each request's shard waits for the other request's: serialised requests would break the barrier."""
    pre, encoder = parts
    one = pixels_and_grid(pre, 1)
    results = _submit_all(stage(encoder, 1, run=_meet_in_pairs(encoder)), [one, one])
    for r in results:
        assert isinstance(r, torch.Tensor), r


def test_the_shards_of_one_request_run_at_the_same_time(parts):
    pre, encoder = parts
    [result] = _submit_all(stage(encoder, 2, run=_meet_in_pairs(encoder)), [pixels_and_grid(pre, 2)])
    assert isinstance(result, torch.Tensor), result


def test_a_failing_shard_fails_its_request_only(parts):
    pre, encoder = parts
    fail = threading.Event()

    def run(pixels, grid):
        if fail.is_set():
            raise RuntimeError("replica died")
        return encoder.encode(pixels, grid)

    s = stage(encoder, 2, run=run)
    fail.set()
    [error] = _submit_all(s, [pixels_and_grid(pre, 3)])
    assert isinstance(error, RuntimeError) and "replica died" in str(error)
    fail.clear()
    [ok] = _submit_all(s, [pixels_and_grid(pre, 3)])
    assert isinstance(ok, torch.Tensor)


def test_a_bad_image_in_a_shard_is_named_by_its_place_in_the_request(parts):
    pre, encoder = parts
    images = pixels_and_grid(pre, 4)  # 391, 77, 1196 and 16 tokens: shards [2] and [0, 1, 3]

    def run(pixels, grid):
        if len(grid) == 3:  # the shard's image 2 is the request's image 3
            raise InvalidRequest("image 2 could not be decoded: truncated")
        return encoder.encode(pixels, grid)

    with pytest.raises(InvalidRequest, match="^image 3 could not be decoded: truncated$"):
        stage(encoder, 2, run=run).encode(images)


def test_one_internvl_image_is_spread_over_replicas_by_tiles_and_comes_back_in_order(tmp_path):
    """InternVL's tiles encode independently: a 1280x720 image's tiles are shared out over 3 replicas
    (each gets some), and the gathered rows equal the whole image encoded at once."""
    from triton_vlm.models.tiny_model import make_tiny_model

    path = make_tiny_model(tmp_path / "internvl", family="internvl")
    pre, encoder = Preprocessor(PreprocessConfig(model_path=path)), VisionEncoder(EncoderConfig(model_path=path))
    p = pre(GenerateRequest(text_input="hi", images=[make_image(1280, 720), make_image(300, 200, seed=1)]))
    images = Images.of(pre.family, p.image_grid_thw, pixel_values=torch.as_tensor(p.pixel_values))
    calls = []

    def run_shard(shard, target):
        calls.append(len(shard))
        return encoder.encode(shard.pixel_values, shard.layout)

    sharded = ShardedEncode(run_shard, even(3), encoder.family.embedding_width,
                            pieces=lambda i: i.pieces(encoder.family)).encode(images)
    tiles = int(images.pixel_rows.sum())
    assert tiles > 10 and len(calls) == 3 and sum(calls) == tiles and min(calls) >= tiles // 3
    torch.testing.assert_close(sharded, encoder.encode(p.pixel_values, p.image_grid_thw), rtol=0, atol=1e-5)
