"""InternVL through the real server, in every deployment mode, against transformers' own `generate` on a
tiny checkpoint (112-pixel tiles, 16 tokens each): colocated with encoder DP 2 (a request's tiles shared
out over two replicas, one image's tiles on both), tensor parallelism 2, and E/PD with one language
server and two encoder servers of two replicas each (which tile the images from their files and share
the tiles out over their replicas)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import server_series
from tests.integration.families import CASES, PROMPT, assert_every_mode_equals, images
from triton_vlm.config import EncoderConfig
from triton_vlm.encode.encoder import VisionEncoder
from triton_vlm_clients import stages
from triton_vlm_clients.client import stream

FAMILY = "internvl"
COLOCATED = {"dp2": dict(encoder_dp=2, embedding_cache_mb=0, enable_prefix_caching=False),
             "tp2": dict(encoder_dp=1, tensor_parallel=2)}
EPD = {"epd": dict(encoder_dp=2)}


@pytest.mark.parametrize("case", CASES)
def test_every_mode_equals_transformers(family_servers, family_expected, case):
    assert_every_mode_equals(family_servers, family_expected, case)


def tiles_per_replica(server) -> dict[str, float]:
    return {s["replica"]: v for s, v in server_series(server, "triton_vlm_encoder_images_total")}


def test_one_image_is_encoded_by_both_replicas_tile_by_tile(family_servers, family_model):
    """A single 640x480 image (12 tiles and a thumbnail) is shared out over the two replicas by tiles,
    and its rows come back exactly as one encoder gives them."""
    server = family_servers["dp2"]

    before = tiles_per_replica(server)
    pre = stages.preprocess(server.grpc_url, PROMPT, images("one-image"))
    rows, _ = stages.encode(server.grpc_url, pre)
    after = tiles_per_replica(server)
    assert pre["_IMAGE_LAYOUT"].tolist() == [[13, 4, 3]]
    assert sorted(n - before.get(replica, 0) for replica, n in after.items()) == [6, 7], "tiles per replica"
    whole = VisionEncoder(EncoderConfig(model_path=family_model)).encode(pre["_PIXEL_VALUES"], pre["_IMAGE_LAYOUT"])
    assert rows.shape == (13 * 16, 64)
    np.testing.assert_allclose(rows, whole.numpy(), rtol=0, atol=1e-5)


def test_an_encoder_server_shares_one_images_tiles_over_its_replicas(family_servers, family_expected):
    """E/PD encoder servers cut the files they get into tiles and share those out over their own
    replicas too: the one image of a request goes to one server, and both of its replicas encode tiles."""
    encoders = family_servers.encoders["epd"]
    before = [tiles_per_replica(e) for e in encoders]
    answer = stream(family_servers["epd"].grpc_url, prompt=PROMPT, images=images("one-image"), max_tokens=12)
    assert answer.output_ids == family_expected["one-image"]
    gained = [sorted(n - b.get(replica, 0) for replica, n in tiles_per_replica(e).items())
              for e, b in zip(encoders, before, strict=True)]
    assert sorted(gained) == [[0, 0], [6, 7]], "one server, both replicas, 13 tiles"
