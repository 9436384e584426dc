"""GLM-4.1V through the real server against transformers' own `generate` on a tiny checkpoint, in both of
`families.family_deployments`: colocated (encoder DP 2 and tensor parallelism 2, the fused gate/up split
by rank) and E/PD over gRPC. GLM-4.5V (MoE): `test_glm4v_moe.py`."""

from __future__ import annotations

import pytest
import tritonclient.grpc as grpcclient

from tests.conftest import make_image, server_metric
from tests.integration.families import CASES, PROMPT, VIDEO_SHAPES, assert_every_mode_equals, check_video_parity, images
from tests.integration.test_epd import encoder_shards
from triton_vlm_clients.client import stream

FAMILY = "glm4v"
EPD_TRANSPORT = "grpc"


@pytest.mark.parametrize("case", CASES)
def test_every_mode_equals_transformers(family_servers, family_expected, case):
    assert_every_mode_equals(family_servers, family_expected, case)


def test_an_image_too_small_for_glm_is_refused_and_the_server_keeps_serving(family_servers, family_expected):
    """GLM's resize rule needs both sides of at least 28 pixels: a 20x300 image is that request's error."""
    server = family_servers["colocated"]
    with pytest.raises(grpcclient.InferenceServerException, match=r"image 0 \(20x300\) cannot be used"):
        stream(server.grpc_url, prompt=PROMPT, images=[make_image(20, 300)], max_tokens=4)
    answer = stream(server.grpc_url, prompt=PROMPT, images=images("one-image"), max_tokens=12)
    assert answer.output_ids == family_expected["one-image"]


def test_a_language_server_without_a_cache_sends_a_repeated_image_again(family_servers):
    """`embedding_cache_mb` 0 (the E/PD server's): no hits, the file goes to the encoder server again, and
    the ids are the same."""
    epd, fresh = family_servers["disaggregated"], images("two-sizes", seed=70)
    first = stream(epd.grpc_url, prompt=PROMPT, images=fresh, max_tokens=8)
    before = encoder_shards(family_servers["colocated"].grpc_url)
    again = stream(epd.grpc_url, prompt=PROMPT, images=fresh, max_tokens=8)
    assert again.output_ids == first.output_ids and encoder_shards(family_servers["colocated"].grpc_url) > before
    assert server_metric(epd, "triton_vlm_embedding_cache_hits_total", 'tier="local"') == 0


@pytest.mark.parametrize("shape", VIDEO_SHAPES)
def test_video_in_every_mode_equals_transformers(family_servers, family_model, shape):
    """A clip alone and beside an image, colocated (its temporal patches over two replicas), and through an
    encoder server (the file and its plan go there) and a prefill server. (transformers 4.57's GLM refuses an
    image and a video in one prompt; the reference builds that case from its processor's and model's parts,
    `hf_video_reference.glm_images_and_videos`.)"""
    check_video_parity(family_servers.values(), family_model, VIDEO_SHAPES[shape], seed=5)
