"""Qwen3-VL (dense) through the real server, in every deployment mode, against transformers' own
`generate` on a tiny checkpoint: encoder DP 2 (a request's images split over two replicas, their
deepstack features gathered back in image order), tensor parallelism 2, and E/PD with one language
server and two encoder servers, over gRPC and over shared memory. The MoE: `test_qwen3_vl_moe.py`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

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


FAMILY = "qwen3_vl"


def tiny(family: str, tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp(family) / "model", family=family)


def expectations(model) -> dict[str, list[int]]:
    return {case: reference_generate(model, PROMPT, images(case), max_new_tokens=12) for case in CASES}


@contextlib.contextmanager
def deployments(root, colocated: dict[str, Deployment], epd: dict[str, tuple[Deployment, Callable]]):
    """Servers of every deployment, started together: name -> a running server. `epd`: name -> (the
    encoder servers' deployment, encoder URLs -> the language server's); two encoder servers each."""
    with contextlib.ExitStack() as stack:

        def start(name: str, deployment: Deployment) -> TritonServer:
            server = TritonServer(deployment.render(root / name), graceful_stop=False, log_file=root / f"{name}.log")
            stack.callback(server.stop)
            return server.start()

        started = {name: start(name, d) for name, d in colocated.items()}
        encoders = {name: [start(f"{name}-encoder{i}", pair[0]) for i in range(2)] for name, pair in epd.items()}
        for name, pair in epd.items():
            for server in encoders[name]:
                server.wait_ready(300)
            urls = tuple(e.grpc_url for e in encoders[name])
            started[name] = start(name, pair[1](urls))
        for server in started.values():
            server.wait_ready(300)
        yield started


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny(FAMILY, tmp_path_factory)


@pytest.fixture(scope="module")
def expected(model):
    return expectations(model)


@pytest.fixture(scope="module")
def servers(model, tmp_path_factory):
    encoder = Deployment(model, mode="encoder", encoder_dp=1, embedding_cache_mb=0)

    def language(transport: str) -> Callable[[tuple[str, ...]], Deployment]:
        return lambda urls: Deployment(model, mode="language", encoder_dp=1, minimal=True, embedding_cache_mb=0,
                                       encoder_urls=urls, encoder_transport=transport, encoder_fallback="none")

    with deployments(tmp_path_factory.mktemp("qwen3-servers"), {
        "dp2": Deployment(model, encoder_dp=2, embedding_cache_mb=0, minimal=True),
        "tp2": Deployment(model, encoder_dp=1, tensor_parallel=2, minimal=True),
    }, {"epd-grpc": (encoder, language("grpc")), "epd-shm": (encoder, language("shm"))}) as started:
        yield started


@pytest.mark.parametrize("case", CASES)
def test_every_mode_equals_transformers(servers, expected, case):
    for name in ("dp2", "tp2", "epd-grpc", "epd-shm"):
        answer = stream(servers[name].grpc_url, prompt=PROMPT, images=images(case), max_tokens=12)
        assert answer.output_ids == expected[case], name


def test_two_replicas_gather_embeddings_and_deepstack_features_in_image_order(servers, model):
    """The encode stage's rows are the embeddings and 3 deepstack blocks (4 x hidden wide), and the two
    replicas' shards come back exactly as one encoder gives them."""
    pre = stages.preprocess(servers["dp2"].grpc_url, PROMPT, images("four-images"))
    rows, _ = stages.encode(servers["dp2"].grpc_url, pre)
    whole = VisionEncoder(EncoderConfig(model_path=model)).encode(pre["_PIXEL_VALUES"], pre["_IMAGE_GRID_THW"])
    assert rows.shape == (int(np.prod(pre["_IMAGE_GRID_THW"], axis=1).sum()) // 4, 4 * 64)
    np.testing.assert_allclose(rows, whole.numpy(), rtol=0, atol=1e-5)


def test_a_cached_image_keeps_its_deepstack_features(servers, expected):
    """`tp2` keeps the default embedding cache: a repeated request is 4 hits, and the same ids."""
    server = servers["tp2"]
    stream(server.grpc_url, prompt=PROMPT, images=images("four-images"), max_tokens=12)
    hits = server_metric(server, "triton_vlm_embedding_cache_hits_total", 'tier="local"')
    answer = stream(server.grpc_url, prompt=PROMPT, images=images("four-images"), max_tokens=12)
    assert server_metric(server, "triton_vlm_embedding_cache_hits_total", 'tier="local"') == hits + 4
    assert answer.output_ids == expected["four-images"]
