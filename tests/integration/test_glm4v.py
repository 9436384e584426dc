"""GLM-4.1V through the real server, in every deployment mode, against transformers' own `generate` on a
tiny checkpoint: colocated with encoder DP 2 (a request's images split over two replicas), tensor
parallelism 2 (the fused gate/up split by rank), and E/PD with one language server and two encoder
servers. GLM-4.5V (MoE): `test_glm4v_moe.py`."""

from __future__ import annotations

import pytest

from tests.integration.families import CASES, PROMPT, deployments, images
from triton_vlm.deploy.deployment import Deployment
from triton_vlm_clients.client import stream

FAMILY = "glm4v"


@pytest.fixture(scope="module")
def servers(family_model, tmp_path_factory):
    model = family_model
    encoder = Deployment(model, mode="encoder", encoder_dp=1, embedding_cache_mb=0)

    def language(urls):
        return Deployment(model, mode="language", encoder_dp=1, minimal=True, embedding_cache_mb=0,
                          encoder_urls=urls, encoder_fallback="none")

    with deployments(tmp_path_factory.mktemp("glm4v-servers"), {
        "dp2": Deployment(model, encoder_dp=2, embedding_cache_mb=0, minimal=True),
        "tp2": Deployment(model, encoder_dp=1, tensor_parallel=2, minimal=True),
    }, {"epd": (encoder, language)}) as started:
        yield started


@pytest.mark.parametrize("case", CASES)
def test_every_mode_equals_transformers(servers, family_expected, case):
    for name in ("dp2", "tp2", "epd"):
        answer = stream(servers[name].grpc_url, prompt=PROMPT, images=images(case), max_tokens=12)
        assert answer.output_ids == family_expected[case], name


def test_an_image_too_small_for_glm_is_refused_and_the_server_keeps_serving(servers, family_expected):
    """GLM's resize rule needs both sides of at least 28 pixels: a 20x300 image is that request's error."""
    import tritonclient.grpc as grpcclient

    from tests.conftest import make_image

    server = servers["dp2"]
    with pytest.raises(grpcclient.InferenceServerException, match=r"image 0 \(20x300\) cannot be used"):
        stream(server.grpc_url, prompt=PROMPT, images=[make_image(20, 300)], max_tokens=4)
    assert stream(server.grpc_url, prompt=PROMPT, images=images("one-image"), max_tokens=12).output_ids == \
        family_expected["one-image"]
