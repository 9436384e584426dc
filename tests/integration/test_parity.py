"""Greedy output ids through the real server equal transformers' own generate."""

from __future__ import annotations

import pytest

from tests.conftest import make_image
from tests.reference import reference_generate
from triton_vlm_clients.client import stream

CASES = {
    "text-only": [],
    "one-640x480": [(640, 480)],
    "two-mixed": [(300, 200), (800, 600)],
    "four": [(640, 480), (300, 200), (448, 448), (200, 500)],
}


@pytest.mark.parametrize("case", CASES)
def test_server_greedy_ids_equal_transformers_generate(server, tiny_model, case):
    images = [make_image(w, h, seed=i, fmt="PNG" if i % 2 else "JPEG") for i, (w, h) in enumerate(CASES[case])]
    prompt = "Describe the pictures in detail."
    answer = stream(server.grpc_url, prompt=prompt, images=images, max_tokens=24, temperature=0.0)
    expected = reference_generate(tiny_model, prompt, images, max_new_tokens=24)
    assert answer.output_ids == expected
    assert answer.finish_reason == ("stop" if len(expected) < 24 else "length")
