"""InternVL through the real server against transformers' own `generate` on a tiny checkpoint (112-pixel
tiles, 16 tokens each), in both of `families.family_deployments`: colocated (encoder DP 2, a request's
tiles shared out over two replicas, one image's tiles on both; tensor parallelism 2) and E/PD over gRPC,
whose encoder server tiles the images from their files and shares the tiles out over its replicas."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import server_series
from tests.integration.families import CASES, PROMPT, assert_every_mode_equals, images
from tests.reference import reference_generate
from triton_vlm.config import EncoderConfig
from triton_vlm.encode.encoder import VisionEncoder
from triton_vlm_clients import stages
from triton_vlm_clients.client import stream

FAMILY = "internvl"
EPD_TRANSPORT = "grpc"


@pytest.mark.parametrize("case", CASES)
def test_every_mode_equals_transformers(family_servers, family_expected, case):
    assert_every_mode_equals(family_servers, family_expected, case)


def tiles_per_replica(server) -> dict[str, float]:
    return {s["replica"]: v for s, v in server_series(server, "triton_vlm_encoder_images_total")}


def test_one_image_is_encoded_by_both_replicas_tile_by_tile(family_servers, family_model):
    """A single 640x480 image (12 tiles and a thumbnail) is shared out over the two replicas by tiles,
    and its rows come back exactly as one encoder gives them (an image no cache has seen)."""
    server = family_servers["colocated"]

    before = tiles_per_replica(server)
    pre = stages.preprocess(server.grpc_url, PROMPT, images("one-image", seed=50))
    rows, _ = stages.encode(server.grpc_url, pre)
    after = tiles_per_replica(server)
    assert pre["_IMAGE_LAYOUT"].tolist() == [[13, 4, 3]]
    assert sorted(n - before.get(replica, 0) for replica, n in after.items()) == [6, 7], "tiles per replica"
    whole = VisionEncoder(EncoderConfig(model_path=family_model)).encode(pre["_PIXEL_VALUES"], pre["_IMAGE_LAYOUT"])
    assert rows.shape == (13 * 16, 64)
    np.testing.assert_allclose(rows, whole.numpy(), rtol=0, atol=1e-5)


def test_an_encoder_server_shares_one_images_tiles_over_its_replicas(family_servers, family_model):
    """An E/PD encoder server cuts the file it gets into tiles and shares those out over its own replicas
    too: both of them encode tiles of the request's one image (an image no cache has seen)."""
    encoder, fresh = family_servers["colocated"], images("one-image", seed=60)
    before = tiles_per_replica(encoder)
    answer = stream(family_servers["disaggregated"].grpc_url, prompt=PROMPT, images=fresh, max_tokens=12)
    assert answer.output_ids == reference_generate(family_model, PROMPT, fresh, max_new_tokens=12)
    gained = sorted(n - before.get(replica, 0) for replica, n in tiles_per_replica(encoder).items())
    assert gained == [6, 7], "both replicas, 13 tiles"
