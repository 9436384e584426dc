"""Video input through the real server (the committed repository: Qwen2.5-VL, two encoder replicas) against
transformers' own processor (its torchvision video processor) and `generate`, run in the video reference
environment (`tests.reference.reference_video_generate`); one clip's frames split over both replicas; the
embedding cache. Qwen3-VL's video parity: `test_qwen3_vl.py`; bad videos: `test_bad_input.py`."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import server_metric, server_series
from tests.integration.families import QUESTION, VIDEO_SHAPES, check_video_parity
from tests.reference import reference_video_generate
from triton_vlm_clients import stages
from triton_vlm_clients.client import stream
from triton_vlm_clients.clips import make_clip


@pytest.mark.parametrize("shape", VIDEO_SHAPES)
def test_a_clip_alone_and_beside_an_image_equals_transformers(server, tiny_model, shape):
    check_video_parity([server], tiny_model, VIDEO_SHAPES[shape], seed=1)


def _per_replica_patches(server) -> dict[str, float]:
    return {s["replica"]: v for s, v in server_series(server, "triton_vlm_encoder_patches_total")}


def test_one_clip_is_split_over_both_replicas_with_the_same_ids(server, tiny_model):
    """32 frames (4 s at 8 fps, sampled at 8) are 16 temporal patches: both replicas encode some of them,
    all of the clip's patch rows between them, and the ids are transformers'."""
    clip = make_clip(seconds=4.0, fps=8.0, seed=32)
    grid = stages.preprocess(server.grpc_url, QUESTION, [], videos=[clip],
                             mm_processor_kwargs={"fps": 8})["_IMAGE_LAYOUT"]
    assert grid.tolist() == [[16, 6, 10]]
    before = _per_replica_patches(server)
    answer = stream(server.grpc_url, prompt=QUESTION, videos=[clip], mm_processor_kwargs={"fps": 8}, max_tokens=8)
    grown = {r: v - before.get(r, 0) for r, v in _per_replica_patches(server).items()}
    assert len(grown) == 2 and all(v > 0 for v in grown.values()), grown
    assert sum(grown.values()) == int(np.prod(grid))
    reference = [{"role": "user", "content": [{"type": "video", "file": "clip.mp4"},
                                              {"type": "text", "text": QUESTION}]}]
    _, expected = reference_video_generate(tiny_model, reference, {"clip.mp4": clip}, 8, fps=8)
    assert answer.output_ids == expected


def test_the_same_clip_twice_is_a_cache_hit_that_skips_the_encoder(server):
    clip = make_clip(seconds=2.0, seed=77)
    first = stream(server.grpc_url, prompt=QUESTION, videos=[clip], max_tokens=6)
    hits = server_metric(server, "triton_vlm_embedding_cache_hits_total", 'tier="local"')
    patches = sum(_per_replica_patches(server).values())
    second = stream(server.grpc_url, prompt=QUESTION, videos=[clip], max_tokens=6)
    assert server_metric(server, "triton_vlm_embedding_cache_hits_total", 'tier="local"') == hits + 1
    assert sum(_per_replica_patches(server).values()) == patches  # no encoder ran
    assert second.output_ids == first.output_ids
    # another sampling of the same file is another key: encoded again
    stream(server.grpc_url, prompt=QUESTION, videos=[clip], max_tokens=6, mm_processor_kwargs={"fps": 4})
    assert sum(_per_replica_patches(server).values()) > patches
