"""Video preprocessing without a server: each family's frames, sizes, pixel rows and prompt ids equal
transformers' own video processor and processor (`tests.reference.reference_video_inputs`, in the video
reference environment); every limit is a clear error before any frame is decoded; the plan that travels to
encoder servers is checked there."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tests.reference import reference_video_inputs
from triton_vlm.config import PreprocessConfig
from triton_vlm.errors import InvalidRequest
from triton_vlm.models import load_family
from triton_vlm.models.tiny_model import make_tiny_model
from triton_vlm.preprocess import video_inputs
from triton_vlm.preprocess.stage import Preprocessor
from triton_vlm.preprocess.video_inputs import VideoProcessing, unwrap, wrap
from triton_vlm.protocol import GenerateRequest, VideoSampling
from triton_vlm_clients.clips import make_clip

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "glm4v")
MESSAGES = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]


@pytest.fixture(scope="module", params=FAMILIES)
def family_path(request, tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp(request.param) / "model", family=request.param)


@pytest.mark.parametrize("sampling", [VideoSampling(), VideoSampling(fps=5.0, max_frames=10)],
                         ids=["defaults", "fps-5-max-frames-10"])
def test_pixels_grid_and_prompt_equal_transformers_processor(family_path, sampling):
    """A 3 s clip of 8 fps at 100x70 (not a multiple of any patch): exactly the same pixel rows."""
    clip = make_clip(seconds=3.0, fps=8.0, width=100, height=70, seed=4)
    ours = Preprocessor(PreprocessConfig(model_path=family_path))(GenerateRequest(
        messages=json.dumps(MESSAGES), videos=[clip], video_sampling=sampling))
    reference = [{"role": "user", "content": [{"type": "video", "file": "v.mp4"}, MESSAGES[0]["content"][1]]}]
    theirs = reference_video_inputs(family_path, reference, {"v.mp4": clip}, fps=sampling.fps,
                                    max_frames=sampling.max_frames)
    assert ours.image_grid_thw.tolist() == theirs["video_grid_thw"].tolist()
    assert ours.input_ids.tolist() == theirs["input_ids"].tolist()
    assert np.array_equal(ours.pixel_values, theirs["pixel_values_videos"])


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("qwen") / "model", family="qwen2_5_vl")


LIMITS = {  # a limit and the error it gives a 3 s, 8 fps, 128x96 clip (6 frames at 2 fps: 3 x 15 tokens)
    "bytes": (dict(max_video_bytes=1000), VideoSampling(), r"video 0 is \d+ bytes; the limit is 1000"),
    "frames": (dict(max_video_frames=4), VideoSampling(), "video 0 samples to 6 frames; the limit is 4"),
    "seconds": (dict(max_video_seconds=2.5), VideoSampling(), "video 0 is 3.0s long; the limit is 2.5s"),
    "tokens": (dict(max_video_tokens=44), VideoSampling(), "the videos make 45 prompt tokens; the limit is 44"),
    "fps": (dict(max_video_fps=4), VideoSampling(fps=5), "fps 5 is over the limit of 4"),
    "max_frames": (dict(max_video_frames=4), VideoSampling(max_frames=5), "max_frames 5 is over the limit of 4"),
    "pixels": (dict(max_image_pixels=10_000), VideoSampling(), "video 0 is 128x96; the limit is 10000 pixels"),
    "videos": (dict(max_videos=0), VideoSampling(), "1 videos sent; the limit is 0"),
}


@pytest.mark.parametrize("limit", LIMITS)
def test_each_limit_refuses_before_any_frame_is_decoded(qwen, monkeypatch, limit):
    settings, sampling, message = LIMITS[limit]
    pre = Preprocessor(PreprocessConfig(model_path=qwen, **settings))
    monkeypatch.setattr(video_inputs, "decode", lambda *a: pytest.fail("decoded before refusing"))
    with pytest.raises(InvalidRequest, match=message):
        pre(GenerateRequest(text_input="what", videos=[make_clip()], video_sampling=sampling))


def test_decoding_past_its_deadline_is_the_requests_error(qwen):
    pre = Preprocessor(PreprocessConfig(model_path=qwen, video_decode_timeout_s=0.0))
    with pytest.raises(InvalidRequest, match="video 0 took longer than 0s to decode"):
        pre(GenerateRequest(text_input="what", videos=[make_clip()]))


def test_an_encoder_server_checks_the_plan_that_comes_with_a_video(qwen):
    videos = VideoProcessing(load_family(qwen), PreprocessConfig(model_path=qwen))
    clip = make_clip()
    plan = videos.plan(clip, 0, VideoSampling(fps=4))
    data, same = unwrap(wrap(clip, plan), 0, videos)
    assert data == clip and np.array_equal(same.indices, plan.indices) and same.layout == plan.layout
    for bad in (dataclasses.replace(plan, indices=plan.indices + 100),
                dataclasses.replace(plan, height=plan.height * 2), dataclasses.replace(plan, layout=(99, 1, 1))):
        with pytest.raises(InvalidRequest, match="its plan does not fit"):
            unwrap(wrap(clip, bad), 0, videos)
    with pytest.raises(InvalidRequest, match="a malformed video envelope"):
        unwrap(video_inputs.ENVELOPE + b"{not json\n" + clip, 0, videos)


def test_a_model_without_video_says_so(tmp_path):
    path = make_tiny_model(tmp_path / "internvl", family="internvl")
    with pytest.raises(InvalidRequest, match="internvl models do not take video input"):
        Preprocessor(PreprocessConfig(model_path=path))(GenerateRequest(text_input="what", videos=[make_clip()]))
