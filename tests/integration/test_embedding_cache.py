"""The embedding cache through the real server (the committed repository: cache on): repeated images
skip the encoder, and the answers stay transformers' own. (Two servers sharing a real redis-server are
test_pd.py's two decode servers.)"""

from __future__ import annotations

from tests.conftest import make_image, server_metric
from tests.reference import reference_generate
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
