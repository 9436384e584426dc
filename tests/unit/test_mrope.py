"""Our M-RoPE positions equal transformers' get_rope_index for prompts with several images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from tests.conftest import make_image
from tests.reference import reference_inputs
from triton_vlm.config import PreprocessConfig
from triton_vlm.models import load_family
from triton_vlm.models.mrope import mrope_positions
from triton_vlm.models.tiny_model import make_tiny_model
from triton_vlm.preprocess.stage import Preprocessor
from triton_vlm.protocol import GenerateRequest, VideoSampling
from triton_vlm_clients.clips import make_clip


def test_positions_and_delta_match_transformers(tiny_model):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model)
    images = [make_image(300, 200), make_image(100, 400, seed=1), make_image(56, 56, seed=2)]
    inputs = reference_inputs(tiny_model, "compare these", images)
    expected, delta = model.model.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"])
    ours, our_delta = load_family(tiny_model).positions(inputs["input_ids"][0].numpy(),
                                                        inputs["image_grid_thw"].numpy())
    assert np.array_equal(ours, expected[:, 0].numpy())
    assert our_delta == int(delta[0, 0])


@pytest.mark.parametrize("family,fps", [("qwen2_5_vl", None), ("qwen2_5_vl", 3.0), ("qwen3_vl", 3.0)])
def test_video_positions_match_transformers(tmp_path, family, fps):
    """A video between two images: Qwen2.5-VL's temporal patches `temporal_patch_size / fps` seconds apart
    on the time axis (3 fps: a step that is no whole number), Qwen3-VL's each a block of its own."""
    import transformers

    path = make_tiny_model(tmp_path / family, family=family)
    model = transformers.AutoModelForImageTextToText.from_pretrained(path)
    content = [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "what happens"}, {"type": "image"}]
    request = GenerateRequest(messages=json.dumps([{"role": "user", "content": content}]),
                              images=[make_image(90, 60), make_image(60, 120, seed=1)],
                              videos=[make_clip(seconds=2.0, fps=8.0, width=96, height=64)],
                              video_sampling=VideoSampling(fps=fps))
    out = Preprocessor(PreprocessConfig(model_path=path))(request)
    grids = torch.as_tensor(out.image_grid_thw)
    is_video = grids[:, 0] > 1
    kwargs = {}
    if family == "qwen2_5_vl":
        kwargs["second_per_grid_ts"] = torch.tensor([2 / (fps or 2.0)])
    expected, delta = model.model.get_rope_index(torch.as_tensor(out.input_ids)[None], grids[~is_video],
                                                 grids[is_video], **kwargs)
    ours, our_delta = load_family(path).positions(out.input_ids, out.image_grid_thw, out.sampling.video_fps)
    assert is_video.sum() == 1 and np.array_equal(ours, expected[:, 0].numpy())
    assert our_delta == int(delta[0, 0])


def test_text_only_positions_are_plain():
    pos, delta = mrope_positions(np.arange(5), [], media_token_ids=[99], merge_size=2)
    assert np.array_equal(pos, np.tile(np.arange(5), (3, 1))) and delta == 0
    assert torch.is_tensor(torch.as_tensor(pos))
