"""InternVL through the real server, in every deployment mode, against transformers' own `generate` on a
tiny checkpoint (112-pixel tiles, 16 tokens each): colocated with encoder DP 2 (a request's tiles shared
out over two replicas, one image's tiles on both), tensor parallelism 2, and E/PD with one language
server and two encoder servers (which tile the images from their files)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import server_series
from tests.integration.families import CASES, PROMPT, deployments, images
from triton_vlm.config import EncoderConfig
from triton_vlm.deploy.deployment import Deployment
from triton_vlm.encode.encoder import VisionEncoder
from triton_vlm_clients import stages
from triton_vlm_clients.client import stream

FAMILY = "internvl"


@pytest.fixture(scope="module")
def servers(family_model, tmp_path_factory):
    model = family_model
    encoder = Deployment(model, mode="encoder", encoder_dp=1, embedding_cache_mb=0)

    def language(urls):
        return Deployment(model, mode="language", encoder_dp=1, minimal=True, embedding_cache_mb=0,
                          encoder_urls=urls, encoder_fallback="none")

    with deployments(tmp_path_factory.mktemp("internvl-servers"), {
        "dp2": Deployment(model, encoder_dp=2, embedding_cache_mb=0, minimal=True),
        "tp2": Deployment(model, encoder_dp=1, tensor_parallel=2, minimal=True),
    }, {"epd": (encoder, language)}) as started:
        yield started


@pytest.mark.parametrize("case", CASES)
def test_every_mode_equals_transformers(servers, family_expected, case):
    for name in ("dp2", "tp2", "epd"):
        answer = stream(servers[name].grpc_url, prompt=PROMPT, images=images(case), max_tokens=12)
        assert answer.output_ids == family_expected[case], name


def test_one_image_is_encoded_by_both_replicas_tile_by_tile(servers, family_model):
    """A single 640x480 image (12 tiles and a thumbnail) is shared out over the two replicas by tiles,
    and its rows come back exactly as one encoder gives them."""
    server = servers["dp2"]
    def tiles_per_replica() -> dict[str, float]:
        return {s["replica"]: v for s, v in server_series(server, "triton_vlm_encoder_images_total")}

    before = tiles_per_replica()
    pre = stages.preprocess(server.grpc_url, PROMPT, images("one-image"))
    rows, _ = stages.encode(server.grpc_url, pre)
    after = tiles_per_replica()
    assert pre["_IMAGE_GRID_THW"].tolist() == [[13, 4, 3]]
    assert sorted(n - before.get(replica, 0) for replica, n in after.items()) == [6, 7], "tiles per replica"
    whole = VisionEncoder(EncoderConfig(model_path=family_model)).encode(pre["_PIXEL_VALUES"], pre["_IMAGE_GRID_THW"])
    assert rows.shape == (13 * 16, 64)
    np.testing.assert_allclose(rows, whole.numpy(), rtol=0, atol=1e-5)
