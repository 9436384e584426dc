"""Every bad request of tests/bad_requests.py is refused by `Preprocessor` (the `preprocess` step's work, without
Triton) with an InvalidRequest naming its fault, before any model runs. (Two of them also go through a server,
in tests/integration/test_bad_input.py, with the 400 and the count that a server adds.)"""

from __future__ import annotations

import re
import tracemalloc

import pytest

from tests.bad_requests import BAD
from triton_vlm.config import PreprocessConfig
from triton_vlm.errors import InvalidRequest
from triton_vlm.preprocess.stage import Preprocessor
from triton_vlm.protocol import request_from_arrays
from triton_vlm_clients.client import request_tensors
from triton_vlm_clients.clips import y4m


@pytest.fixture(scope="module")
def preprocessor(tiny_model):
    return Preprocessor(PreprocessConfig(model_path=tiny_model))  # the server's default limits


@pytest.mark.parametrize("case", BAD)
def test_a_bad_request_is_refused_naming_its_fault(preprocessor, case):
    request, message = BAD[case]
    arrays = request_tensors(**{"prompt": "describe", "max_tokens": 4, **request})
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        preprocessor(request_from_arrays(arrays, preprocessor.default_sampling))


def test_a_clip_of_no_frames_costs_its_header_only():
    """The "header claiming 100000x100000" case is `y4m(100_000, 100_000, 0)`. It once built a 10 GB frame to
    multiply by 0: 20 GB of memory and 30 s at every collection, and an OOM kill beside a running server."""
    tracemalloc.start()
    try:
        clip = y4m(20_000, 20_000, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert clip == b"YUV4MPEG2 W20000 H20000 F25:1 Ip A1:1 Cmono\n" and peak < 1 << 20, peak
