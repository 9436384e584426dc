"""Data-parallel vision encoder through the real server: the committed repository (2 encoder replicas,
a request's images split over them) against one whole encoder in this process and transformers' ids, and
under concurrent load."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.conftest import make_image, server_metric, server_series
from tests.reference import reference_generate
from triton_vlm.config import EncoderConfig
from triton_vlm.encode.encoder import VisionEncoder
from triton_vlm_clients import stages
from triton_vlm_clients.client import stream

MIXED = [(640, 480), (300, 200), (1280, 720), (200, 500)]


def images(n, seed=0):
    return [make_image(w, h, seed=seed + i, fmt="PNG" if i % 2 else "JPEG") for i, (w, h) in enumerate(MIXED[:n])]


@pytest.mark.parametrize("n_images", [1, 3, 4])
def test_two_replicas_give_the_embeddings_of_one_encoder_and_transformers_ids(server, tiny_model, n_images):
    """The committed repository's two replicas each encode a shard of the request's images (new ones: no
    cache has them): the rows put back together are one whole encoder's, and the ids transformers'."""
    prompt, imgs = "Compare the pictures.", images(n_images, seed=300 + 10 * n_images)
    pre = stages.preprocess(server.grpc_url, prompt, imgs)
    grid = pre["_IMAGE_LAYOUT"]
    rows, _ = stages.encode(server.grpc_url, pre)
    whole = VisionEncoder(EncoderConfig(model_path=tiny_model)).encode(pre["_PIXEL_VALUES"], grid).numpy()
    assert rows.shape == whole.shape == (int(np.prod(grid, axis=1).sum()) // 4, whole.shape[1])
    np.testing.assert_allclose(rows, whole, rtol=0, atol=1e-5)
    answer = stream(server.grpc_url, prompt=prompt, images=imgs, max_tokens=16)
    assert answer.output_ids == reference_generate(tiny_model, prompt, imgs, max_new_tokens=16)


def test_encode_metrics_show_the_split_over_the_replicas(server):
    """A 4-image request of new images is one encoding in 2 shards: both replicas count their images and
    patches, which add up to the request's."""
    imgs = images(4, seed=500)  # not cached yet
    grid = stages.preprocess(server.grpc_url, "Compare.", imgs)["_IMAGE_LAYOUT"]
    shards = [server_metric(server, f"triton_vlm_encode_shards_{part}", 'stage="encode"') for part in ("count", "sum")]
    replicas = _per_replica(server)
    stream(server.grpc_url, prompt="Compare.", images=imgs, max_tokens=2)
    assert [server_metric(server, f"triton_vlm_encode_shards_{part}", 'stage="encode"') - before
            for part, before in zip(("count", "sum"), shards, strict=True)] == [1, 2]
    grown = {r: (images - replicas.get(r, (0, 0))[0], patches - replicas.get(r, (0, 0))[1])
             for r, (images, patches) in _per_replica(server).items()}
    assert len(grown) == 2 and all(n > 0 for n, _ in grown.values()), grown
    assert sum(n for n, _ in grown.values()) == 4
    assert sum(p for _, p in grown.values()) == int(np.prod(grid, axis=1).sum())


def _per_replica(server) -> dict[str, tuple[float, float]]:
    images = {s["replica"]: v for s, v in server_series(server, "triton_vlm_encoder_images_total")}
    patches = {s["replica"]: v for s, v in server_series(server, "triton_vlm_encoder_patches_total")}
    return {replica: (n, patches[replica]) for replica, n in images.items()}


def test_eight_concurrent_clients_with_many_images_all_complete_correctly(server, tiny_model):
    requests = [(f"Picture set {i}: what is in them?", images(2 + i % 3, seed=10 * i)) for i in range(16)]
    expected = [reference_generate(tiny_model, prompt, imgs, max_new_tokens=8) for prompt, imgs in requests]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda r: stream(server.grpc_url, prompt=r[0], images=r[1], max_tokens=8),
                                requests))
    assert [a.output_ids for a in answers] == expected
    assert all(a.finish_reason in ("stop", "length") for a in answers)
