"""GLM-4.5V (MoE) through the real server against transformers' own `generate` on a tiny checkpoint, in
both of `families.family_deployments`: colocated (two tensor-parallel ranks, each holding a slice of every
routed and shared expert, and two encoder replicas) and E/P/D (the embeddings over shared memory from the
colocated server; prefilled on its TP 2 engine, decoded on TP 1, the KV moved by NIXL)."""

from __future__ import annotations

import pytest

from tests.integration.families import CASES, VIDEO_SHAPES, assert_every_mode_equals, check_video_parity

FAMILY = "glm4v_moe"
EPD_TRANSPORT = "shm"


@pytest.mark.parametrize("case", CASES)
def test_every_mode_equals_transformers(family_servers, family_expected, case):
    assert_every_mode_equals(family_servers, family_expected, case)


def test_a_clip_in_every_mode_equals_transformers(family_servers, family_model):
    """Video through the MoE decoder and both deployments (embeddings over shared memory from the encoder
    servers)."""
    check_video_parity(family_servers.values(), family_model, VIDEO_SHAPES["clip"], seed=9)
