"""GLM-4.1V through the real server, in every deployment mode, against transformers' own `generate` on a
tiny checkpoint: colocated with encoder DP 2 (a request's images split over two replicas), tensor
parallelism 2 (the fused gate/up split by rank), and E/PD with one language server and two encoder
servers. GLM-4.5V (MoE): `test_glm4v_moe.py`."""

from __future__ import annotations

import pytest
import tritonclient.grpc as grpcclient

from tests.conftest import make_image
from tests.integration.families import CASES, PROMPT, assert_every_mode_equals, images
from triton_vlm_clients.client import stream

FAMILY = "glm4v"
COLOCATED = {"dp2": dict(encoder_dp=2, embedding_cache_mb=0, enable_prefix_caching=False),
             "tp2": dict(encoder_dp=1, tensor_parallel=2)}
EPD = {"epd": {}}


@pytest.mark.parametrize("case", CASES)
def test_every_mode_equals_transformers(family_servers, family_expected, case):
    assert_every_mode_equals(family_servers, family_expected, case)


def test_an_image_too_small_for_glm_is_refused_and_the_server_keeps_serving(family_servers, family_expected):
    """GLM's resize rule needs both sides of at least 28 pixels: a 20x300 image is that request's error."""
    server = family_servers["dp2"]
    with pytest.raises(grpcclient.InferenceServerException, match=r"image 0 \(20x300\) cannot be used"):
        stream(server.grpc_url, prompt=PROMPT, images=[make_image(20, 300)], max_tokens=4)
    answer = stream(server.grpc_url, prompt=PROMPT, images=images("one-image"), max_tokens=12)
    assert answer.output_ids == family_expected["one-image"]
