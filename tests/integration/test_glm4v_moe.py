"""GLM-4.5V (MoE) through the real server against transformers' own `generate` on a tiny checkpoint: two
tensor-parallel ranks (each holding a slice of every routed and shared expert) with two encoder
replicas, and E/PD with one language server and two encoder servers."""

from __future__ import annotations

import pytest

from tests.integration.families import CASES, PROMPT, deployments, images
from triton_vlm.deploy.deployment import Deployment
from triton_vlm_clients.client import stream

FAMILY = "glm4v_moe"


@pytest.fixture(scope="module")
def servers(family_model, tmp_path_factory):
    model = family_model
    encoder = Deployment(model, mode="encoder", encoder_dp=1, embedding_cache_mb=0)

    def language(urls):
        return Deployment(model, mode="language", encoder_dp=1, minimal=True, embedding_cache_mb=0,
                          encoder_urls=urls, encoder_fallback="none")

    with deployments(tmp_path_factory.mktemp("glm4v-moe-servers"), {
        "tp2": Deployment(model, encoder_dp=2, tensor_parallel=2, embedding_cache_mb=0, minimal=True),
    }, {"epd": (encoder, language)}) as started:
        yield started


@pytest.mark.parametrize("case", CASES)
def test_every_mode_equals_transformers(servers, family_expected, case):
    for name in ("tp2", "epd"):
        answer = stream(servers[name].grpc_url, prompt=PROMPT, images=images(case), max_tokens=12)
        assert answer.output_ids == family_expected[case], name
