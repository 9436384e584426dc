"""The embedding cache in the encode stage, with the real tiny vision encoder and no Triton: repeated
images are not encoded again and give the same embeddings; the cache stays within its byte budget."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_image
from triton_vlm.config import EncoderConfig, PreprocessConfig
from triton_vlm.encode.dispatch import ShardedEncode, even
from triton_vlm.encode.embedding_cache import EmbeddingCache
from triton_vlm.encode.encoder import VisionEncoder
from triton_vlm.preprocess.image_inputs import Images
from triton_vlm.preprocess.image_keys import image_key, model_fingerprint
from triton_vlm.preprocess.stage import Preprocessor
from triton_vlm.protocol import GenerateRequest

SIZES = [(160, 120), (90, 140), (200, 100), (64, 64)]


@pytest.fixture(scope="module")
def parts(tiny_model):
    return Preprocessor(PreprocessConfig(model_path=tiny_model)), VisionEncoder(EncoderConfig(model_path=tiny_model))


def request(pre, order):
    """The images of SIZES at `order` (repeats allowed): (Images, content keys)."""
    files = [make_image(*SIZES[i], seed=i) for i in order]
    p = pre(GenerateRequest(text_input="hi", images=files))
    return Images.of(pre.family, p.image_grid_thw, pixel_values=torch.as_tensor(p.pixel_values)), p.image_keys


def cached_stage(encoder, cache):
    encoded = []  # images each encoder call got

    def run_shard(images, target):
        encoded.append(len(images))
        return encoder.encode(images.pixel_values, images.layout)

    counts = []
    if cache is not None:
        cache.on_lookup = lambda hits, misses: counts.append((hits, misses))
    stage = ShardedEncode(run_shard, even(2), encoder.family.embedding_width,
                          cache=cache)
    return stage, encoded, counts


def test_keys_follow_the_content_and_the_model(parts, tiny_model, tmp_path):
    pre, _ = parts
    _, keys = request(pre, [0, 1, 0])
    assert keys[0] == keys[2] != keys[1]
    assert image_key(model_fingerprint(tiny_model), b"x") != image_key(model_fingerprint(tmp_path), b"x")


def test_a_repeated_request_is_not_encoded_again_and_gets_the_same_embeddings(parts):
    pre, encoder = parts
    stage, encoded, counts = cached_stage(encoder, EmbeddingCache(2**30))
    images, keys = request(pre, [0, 1, 2, 3])
    first = stage.encode(images, keys)
    assert torch.equal(first, encoder.encode(images.pixel_values, images.layout))
    calls = len(encoded)
    again = stage.encode(images, keys)
    assert torch.equal(again, first) and len(encoded) == calls and counts == [({"local": 0}, 4), ({"local": 4}, 0)]


def test_mixed_order_new_images_and_repeats_inside_a_request(parts):
    pre, encoder = parts
    stage, encoded, counts = cached_stage(encoder, EmbeddingCache(2**30))
    stage.encode(*request(pre, [0, 1]))
    images, keys = request(pre, [1, 2, 2, 0])  # cached 1 and 0, a new 2 twice
    encoded.clear()
    out = stage.encode(images, keys)
    assert torch.equal(out, encoder.encode(images.pixel_values, images.layout))
    assert encoded == [1] and counts[-1] == ({"local": 3}, 1), "the new image, once"


def test_without_a_cache_every_image_is_encoded(parts):
    pre, encoder = parts
    stage, encoded, _ = cached_stage(encoder, None)
    images, keys = request(pre, [0, 0])
    stage.encode(images, keys)
    stage.encode(images, keys)
    assert sum(encoded) == 4


def test_eviction_keeps_the_cache_within_its_budget(parts):
    pre, encoder = parts
    images, keys = request(pre, [0, 1, 2, 3])
    sizes = [t.numel() * 4 for t in torch.split(encoder.encode(images.pixel_values, images.layout),
                                                 encoder.family.tokens_per_image(images.layout).tolist())]
    cache = EmbeddingCache(sizes[2] + sizes[3])  # room for the last two only
    stage, _, counts = cached_stage(encoder, cache)
    stage.encode(images, keys)
    assert cache.bytes <= cache.max_bytes and len(cache) == 2
    stage.encode(*request(pre, [3, 2]))
    assert counts[-1] == ({"local": 2}, 0), "the most recent entries stayed"
