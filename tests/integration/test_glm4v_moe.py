"""GLM-4.5V (MoE) through the real server against transformers' own `generate` on a tiny checkpoint, in
both of `families.family_deployments`: colocated (two tensor-parallel ranks, each holding a slice of every
routed and shared expert, and two encoder replicas) and E/PD over shared memory."""

from __future__ import annotations

import pytest

from tests.integration.families import CASES, assert_every_mode_equals

FAMILY = "glm4v_moe"
EPD_TRANSPORT = "shm"


@pytest.mark.parametrize("case", CASES)
def test_every_mode_equals_transformers(family_servers, family_expected, case):
    assert_every_mode_equals(family_servers, family_expected, case)
