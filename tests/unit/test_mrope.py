"""Our M-RoPE positions equal transformers' get_rope_index for prompts with several images."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from tests.conftest import make_image
from tests.reference import reference_inputs
from triton_vlm.models.mrope import mrope_positions


def test_positions_and_delta_match_transformers(tiny_model):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model)
    images = [make_image(300, 200), make_image(100, 400, seed=1), make_image(56, 56, seed=2)]
    inputs = reference_inputs(tiny_model, "compare these", images)
    expected, delta = model.model.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"])
    ours, our_delta = mrope_positions(inputs["input_ids"][0].numpy(), inputs["image_grid_thw"].numpy(),
                                      model.config.image_token_id, 2)
    assert np.array_equal(ours, expected[:, 0].numpy())
    assert our_delta == int(delta[0, 0])


def test_text_only_positions_are_plain():
    pos, delta = mrope_positions(np.arange(5), np.zeros((0, 3), np.int64), image_token_id=99, merge_size=2)
    assert np.array_equal(pos, np.tile(np.arange(5), (3, 1))) and delta == 0
    assert torch.is_tensor(torch.as_tensor(pos))
