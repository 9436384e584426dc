"""Qwen3-VL (dense) through the real server against transformers' own `generate` on a tiny checkpoint, in
both of `families.family_deployments`: colocated (encoder DP 2, a request's images split over two replicas
and their deepstack features gathered back in image order; tensor parallelism 2) and the full E/P/D, the
deepstack features coming back from 2 encoder servers by gRPC (the MoE's, `test_qwen3_vl_moe.py`, by shared
memory) and the KV (with the M-RoPE delta) over gRPC (the MoE's by NIXL)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import server_metric
from tests.integration.families import CASES, PROMPT, VIDEO_SHAPES, assert_every_mode_equals, check_video_parity, images
from tests.integration.test_prefix_caching import check_chat, check_other_pixels_miss
from triton_vlm.config import EncoderConfig
from triton_vlm.encode.encoder import VisionEncoder
from triton_vlm_clients import stages
from triton_vlm_clients.client import stream

FAMILY = "qwen3_vl"
EPD_TRANSPORT = "grpc"
FULL_EPD = True


@pytest.mark.parametrize("case", CASES)
def test_every_mode_equals_transformers(family_servers, family_expected, case):
    assert_every_mode_equals(family_servers, family_expected, case)


def test_two_replicas_gather_embeddings_and_deepstack_features_in_image_order(family_servers, family_model):
    """The encode stage's rows are the embeddings and 3 deepstack blocks (4 x hidden wide), and the two
    replicas' shards come back exactly as one encoder gives them (images no cache has seen)."""
    pre = stages.preprocess(family_servers["colocated"].grpc_url, PROMPT, images("four-images", seed=40))
    rows, _ = stages.encode(family_servers["colocated"].grpc_url, pre)
    encoder = VisionEncoder(EncoderConfig(model_path=family_model))
    whole = encoder.encode(pre["_PIXEL_VALUES"], pre["_IMAGE_LAYOUT"])
    assert rows.shape == (int(np.prod(pre["_IMAGE_LAYOUT"], axis=1).sum()) // 4, 4 * 64)
    np.testing.assert_allclose(rows, whole.numpy(), rtol=0, atol=1e-5)


def test_a_cached_image_keeps_its_deepstack_features(family_servers, family_expected):
    """The colocated server keeps the default embedding cache: a repeated request is 4 hits, and the same
    ids."""
    server = family_servers["colocated"]
    stream(server.grpc_url, prompt=PROMPT, images=images("four-images"), max_tokens=12)
    hits = server_metric(server, "triton_vlm_embedding_cache_hits_total", 'tier="local"')
    answer = stream(server.grpc_url, prompt=PROMPT, images=images("four-images"), max_tokens=12)
    assert server_metric(server, "triton_vlm_embedding_cache_hits_total", 'tier="local"') == hits + 4
    assert answer.output_ids == family_expected["four-images"]


def test_prefix_cache_tells_same_size_images_apart_and_keeps_m_rope_positions(family_servers, family_model):
    """Interleaved M-RoPE and deepstack under prefix reuse: a reused chat prefix and a same-size image of other
    pixels both give transformers' ids (two ranks, paged KV, prefix caching on)."""
    check_other_pixels_miss(family_servers["colocated"], family_model, seed=81)
    check_chat(family_servers["colocated"], family_model, seed=700)


@pytest.mark.parametrize("shape", VIDEO_SHAPES)
def test_video_in_every_mode_equals_transformers(family_servers, family_model, shape):
    """A clip alone and beside an image: colocated (its temporal patches over two replicas), and through encoder
    servers (the file and its plan go there) and a prefill server."""
    check_video_parity(family_servers.values(), family_model, VIDEO_SHAPES[shape], seed=5)
