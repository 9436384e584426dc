"""Qwen3-VL (dense) and Qwen3-VL-MoE through the real server, in every deployment mode, against
transformers' own `generate` on tiny checkpoints: encoder DP 2 (a request's images split over two
replicas, their deepstack features gathered back in image order), tensor parallelism 2 (dense and MoE),
and E/PD with one language server and two encoder servers over gRPC and over shared memory."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from tests.conftest import make_image, server_metric
from tests.reference import reference_generate
from triton_vlm.config import EncoderConfig
from triton_vlm.deploy.deployment import Deployment
from triton_vlm.deploy.server import TritonServer
from triton_vlm.encode.encoder import VisionEncoder
from triton_vlm.models.tiny_model import make_tiny_model
from triton_vlm_clients import stages
from triton_vlm_clients.client import stream

PROMPT = "Describe the pictures."
CASES = {"text-only": [], "one-image": [(640, 480)], "two-sizes": [(300, 200), (200, 500)],
         "four-images": [(640, 480), (300, 200), (800, 600), (200, 500)]}


def images(case: str) -> list[bytes]:
    return [make_image(w, h, seed=i, fmt="PNG" if i % 2 else "JPEG") for i, (w, h) in enumerate(CASES[case])]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    return {family: make_tiny_model(root / family, family=family) for family in ("qwen3_vl", "qwen3_vl_moe")}


@pytest.fixture(scope="module")
def expected(models):
    return {(family, case): reference_generate(models[family], PROMPT, images(case), max_new_tokens=12)
            for family in models for case in CASES}


@pytest.fixture(scope="module")
def servers(models, tmp_path_factory):
    """Every mode at once (the servers start together): name -> a running server."""
    root = tmp_path_factory.mktemp("qwen3-servers")
    dense, moe = models["qwen3_vl"], models["qwen3_vl_moe"]
    with contextlib.ExitStack() as stack:

        def start(name: str, deployment: Deployment) -> TritonServer:
            server = TritonServer(deployment.render(root / name), graceful_stop=False, log_file=root / f"{name}.log")
            stack.callback(server.stop)
            return server.start()

        started = {
            "dense-dp2": start("dense-dp2", Deployment(dense, encoder_dp=2, embedding_cache_mb=0, minimal=True)),
            "dense-tp2": start("dense-tp2", Deployment(dense, encoder_dp=1, tensor_parallel=2, minimal=True)),
            "moe-tp2": start("moe-tp2", Deployment(moe, encoder_dp=2, tensor_parallel=2, embedding_cache_mb=0,
                                                   minimal=True)),
        }
        encoders = [start(f"encoder{i}", Deployment(dense, mode="encoder", encoder_dp=1, embedding_cache_mb=0))
                    for i in range(2)]
        for server in encoders:
            server.wait_ready(300)
        urls = tuple(e.grpc_url for e in encoders)
        for transport in ("grpc", "shm"):
            started[f"dense-epd-{transport}"] = start(f"epd-{transport}", Deployment(
                dense, mode="language", encoder_dp=1, minimal=True, embedding_cache_mb=0, encoder_urls=urls,
                encoder_transport=transport, encoder_fallback="none"))
        for server in started.values():
            server.wait_ready(300)
        yield started


@pytest.mark.parametrize("case", CASES)
def test_every_dense_mode_equals_transformers(servers, expected, case):
    want = expected[("qwen3_vl", case)]
    for name in ("dense-dp2", "dense-tp2", "dense-epd-grpc", "dense-epd-shm"):
        answer = stream(servers[name].grpc_url, prompt=PROMPT, images=images(case), max_tokens=12)
        assert answer.output_ids == want, name


@pytest.mark.parametrize("case", CASES)
def test_moe_with_two_ranks_equals_transformers(servers, expected, case):
    answer = stream(servers["moe-tp2"].grpc_url, prompt=PROMPT, images=images(case), max_tokens=12)
    assert answer.output_ids == expected[("qwen3_vl_moe", case)]


def test_two_replicas_gather_embeddings_and_deepstack_features_in_image_order(servers, models):
    """The encode stage's rows are the embeddings and 3 deepstack blocks (4 x hidden wide), and the two
    replicas' shards come back exactly as one encoder gives them."""
    pre = stages.preprocess(servers["dense-dp2"].grpc_url, PROMPT, images("four-images"))
    rows, _ = stages.encode(servers["dense-dp2"].grpc_url, pre)
    whole = VisionEncoder(EncoderConfig(model_path=models["qwen3_vl"])).encode(pre["_PIXEL_VALUES"],
                                                                                pre["_IMAGE_GRID_THW"])
    assert rows.shape == (int(np.prod(pre["_IMAGE_GRID_THW"], axis=1).sum()) // 4, 4 * 64)
    np.testing.assert_allclose(rows, whole.numpy(), rtol=0, atol=1e-5)


def test_a_cached_image_keeps_its_deepstack_features(servers, expected):
    """`dense-tp2` keeps the default embedding cache: a repeated request is 4 hits, and the same ids."""
    server = servers["dense-tp2"]
    stream(server.grpc_url, prompt=PROMPT, images=images("four-images"), max_tokens=12)
    hits = server_metric(server, "triton_vlm_embedding_cache_hits_total", 'tier="local"')
    answer = stream(server.grpc_url, prompt=PROMPT, images=images("four-images"), max_tokens=12)
    assert server_metric(server, "triton_vlm_embedding_cache_hits_total", 'tier="local"') == hits + 4
    assert answer.output_ids == expected[("qwen3_vl", "four-images")]
