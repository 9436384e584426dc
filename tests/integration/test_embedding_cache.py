"""The embedding cache through the real server (the committed repository: cache on): repeated images
skip the encoder, and the answers stay transformers' own; two servers share a real redis-server."""

from __future__ import annotations

import time

from tests.conftest import make_image, redis_server, server_metric
from tests.integration.serve import serving
from tests.reference import reference_generate
from triton_vlm.deploy.deployment import Deployment
from triton_vlm.deploy.server import free_port
from triton_vlm_clients.client import stream

HITS = ("triton_vlm_embedding_cache_hits_total", 'tier="local"')
MISSES = ("triton_vlm_embedding_cache_misses_total", 'tier="local"')
PROMPT = "Describe the pictures."
IMAGES = [make_image(w, h, seed=100 + i) for i, (w, h) in enumerate([(320, 240), (200, 300), (256, 256), (400, 200)])]


def _counts(server) -> tuple[float, float]:
    return server_metric(server, *HITS), server_metric(server, *MISSES)


def _answer(server, images):
    return stream(server.grpc_url, prompt=PROMPT, images=images, max_tokens=12).output_ids


def test_a_repeated_four_image_request_hits_four_times_with_the_same_ids(server, tiny_model):
    expected = reference_generate(tiny_model, PROMPT, IMAGES, max_new_tokens=12)
    hits, misses = _counts(server)
    assert _answer(server, IMAGES) == expected
    assert _counts(server) == (hits, misses + 4)
    assert _answer(server, IMAGES) == expected
    assert _counts(server) == (hits + 4, misses + 4)


def test_reordered_repeats_with_a_new_image_twice(server, tiny_model):
    _answer(server, IMAGES)  # cached (again, whatever ran before)
    new = make_image(180, 180, seed=999)
    images = [IMAGES[2], new, IMAGES[0], new]
    hits, misses = _counts(server)
    assert _answer(server, images) == reference_generate(tiny_model, PROMPT, images, max_new_tokens=12)
    assert _counts(server) == (hits + 3, misses + 1), "two cached, the new one encoded once"


REDIS_HITS = ("triton_vlm_embedding_cache_hits_total", 'tier="redis"')
RETRY_S = 5  # RedisTier's bypass interval after a failure


def test_two_servers_share_embeddings_through_redis_and_survive_it_going_away(tiny_model, tmp_path):
    port = free_port()
    deployment = Deployment(tiny_model, encoder_dp=1, encoder_threads=1, minimal=True,
                            embedding_cache_redis=f"redis://127.0.0.1:{port}")
    with serving((deployment, tmp_path / "a"), (deployment, tmp_path / "b")) as (a, b):
        with redis_server(port):
            images = [make_image(150, 110, seed=7), make_image(96, 200, seed=8)]
            expected = reference_generate(tiny_model, PROMPT, images, max_new_tokens=12)
            assert _answer(a, images) == expected
            assert _answer(b, images) == expected
            assert server_metric(b, *REDIS_HITS) == 2 and server_metric(b, *MISSES) == 0, "B encoded nothing"
        fresh = [make_image(130, 130, seed=9)]  # Redis is gone: both keep serving, as misses
        for server in (a, b):
            assert _answer(server, fresh) == reference_generate(tiny_model, PROMPT, fresh, max_new_tokens=12)
        with redis_server(port):  # back: used again once the bypass interval is over
            time.sleep(RETRY_S + 1)
            again = [make_image(170, 90, seed=10)]
            assert _answer(a, again) == _answer(b, again)
            assert server_metric(b, *REDIS_HITS) == 3
