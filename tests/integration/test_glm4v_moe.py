"""GLM-4.5V (MoE) through the real server against transformers' own `generate` on a tiny checkpoint: two
tensor-parallel ranks (each holding a slice of every routed and shared expert) with two encoder
replicas, and E/PD with one language server and two encoder servers."""

from __future__ import annotations

import pytest

from tests.integration.families import CASES, assert_every_mode_equals

FAMILY = "glm4v_moe"
COLOCATED = {"tp2": dict(encoder_dp=2, tensor_parallel=2, embedding_cache_mb=0)}
EPD = {"epd": {}}


@pytest.mark.parametrize("case", CASES)
def test_every_mode_equals_transformers(family_servers, family_expected, case):
    assert_every_mode_equals(family_servers, family_expected, case)
