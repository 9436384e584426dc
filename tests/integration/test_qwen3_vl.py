"""Qwen3-VL (dense) through the real server, in every deployment mode, against transformers' own
`generate` on a tiny checkpoint: encoder DP 2 (a request's images split over two replicas, their
deepstack features gathered back in image order), tensor parallelism 2, and E/PD with one language
server and two encoder servers, over gRPC and over shared memory. The MoE: `test_qwen3_vl_moe.py`."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import server_metric
from tests.integration.families import CASES, PROMPT, assert_every_mode_equals, images
from tests.integration.test_prefix_caching import check_chat, check_other_pixels_miss
from triton_vlm.config import EncoderConfig
from triton_vlm.encode.encoder import VisionEncoder
from triton_vlm_clients import stages
from triton_vlm_clients.client import stream

FAMILY = "qwen3_vl"
COLOCATED = {"dp2": dict(encoder_dp=2, embedding_cache_mb=0, enable_prefix_caching=False),
             "tp2": dict(encoder_dp=1, tensor_parallel=2)}
EPD = {"epd-grpc": dict(transport="grpc"), "epd-shm": dict(transport="shm")}


@pytest.mark.parametrize("case", CASES)
def test_every_mode_equals_transformers(family_servers, family_expected, case):
    assert_every_mode_equals(family_servers, family_expected, case)


def test_two_replicas_gather_embeddings_and_deepstack_features_in_image_order(family_servers, family_model):
    """The encode stage's rows are the embeddings and 3 deepstack blocks (4 x hidden wide), and the two
    replicas' shards come back exactly as one encoder gives them."""
    pre = stages.preprocess(family_servers["dp2"].grpc_url, PROMPT, images("four-images"))
    rows, _ = stages.encode(family_servers["dp2"].grpc_url, pre)
    encoder = VisionEncoder(EncoderConfig(model_path=family_model))
    whole = encoder.encode(pre["_PIXEL_VALUES"], pre["_IMAGE_LAYOUT"])
    assert rows.shape == (int(np.prod(pre["_IMAGE_LAYOUT"], axis=1).sum()) // 4, 4 * 64)
    np.testing.assert_allclose(rows, whole.numpy(), rtol=0, atol=1e-5)


def test_a_cached_image_keeps_its_deepstack_features(family_servers, family_expected):
    """`tp2` keeps the default embedding cache: a repeated request is 4 hits, and the same ids."""
    server = family_servers["tp2"]
    stream(server.grpc_url, prompt=PROMPT, images=images("four-images"), max_tokens=12)
    hits = server_metric(server, "triton_vlm_embedding_cache_hits_total", 'tier="local"')
    answer = stream(server.grpc_url, prompt=PROMPT, images=images("four-images"), max_tokens=12)
    assert server_metric(server, "triton_vlm_embedding_cache_hits_total", 'tier="local"') == hits + 4
    assert answer.output_ids == family_expected["four-images"]


def test_prefix_cache_tells_same_size_images_apart_and_keeps_m_rope_positions(family_servers, family_model):
    """Interleaved M-RoPE and deepstack under prefix reuse: a reused chat prefix and a same-size image of other
    pixels both give transformers' ids (`tp2`: two ranks, paged KV, prefix caching on)."""
    check_other_pixels_miss(family_servers["tp2"], family_model, seed=81)
    check_chat(family_servers["tp2"], family_model, seed=700)
