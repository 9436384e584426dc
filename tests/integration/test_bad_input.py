"""Bad input gets a clear error for that request alone, with its code, counted once; the next good request
is served. Every case of tests/bad_requests.py is refused in-process (tests/unit/test_bad_requests.py); an
image's and a video's go through the server here, beside what only a server can get wrong (tensor types,
the unary model's code, a direct call to `preprocess`)."""

from __future__ import annotations

import functools
import io
import json
import re
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.bad_requests import BAD
from tests.conftest import make_image, server_metric
from triton_vlm_clients import stages
from triton_vlm_clients.client import build_inputs, infer, stream


def test_preprocess_refuses_bad_input_with_invalid_arg(server):
    body = json.dumps({"text_input": "x", "images": ["bad"]}).encode()
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/preprocess/generate", data=body,
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=60)
    assert err.value.code == 400 and "image 0 could not be decoded" in err.value.read().decode()


def test_tiny_and_thin_images_are_served(server):
    """1x1 failed inside the image processor ("mean must have 1 elements"); 100x3 got a transposed grid."""
    images = [make_image(1, 1), make_image(100, 3, seed=1), make_image(3, 100, seed=2)]
    grid = stages.preprocess(server.grpc_url, "what is it", images)["_IMAGE_LAYOUT"]
    assert grid.tolist() == [[1, 4, 4], [1, 2, 24], [1, 24, 2]]  # t, h, w: heights 3 and 100 resized by 28s
    answer = stream(server.grpc_url, prompt="what is it", images=images, max_tokens=3)
    assert answer.output_ids


@functools.cache
def _giant_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8192, 8192), 200).save(buf, format="PNG")  # 64 Mi pixels (the limit), a few KB
    return buf.getvalue()


def test_too_many_image_tokens_are_refused_before_any_decoding(server):
    """Token counts come from the headers: eight 8192x8192 PNGs once cost over a minute of decoding before
    this answer (the bound is generous: the answer takes milliseconds)."""
    start = time.monotonic()
    with pytest.raises(InferenceServerException, match="model context is 4096"):
        stream(server.grpc_url, prompt="describe", images=[_giant_png()] * 8, max_tokens=4)
    assert time.monotonic() - start < 10
    _good_request_still_works(server)


def _good_request_still_works(server):
    answer = stream(server.grpc_url, prompt="hello", images=[make_image(64, 64)], max_tokens=3)
    assert len(answer.output_ids) >= 1 and answer.finish_reason in ("stop", "length")


INVALID = ("triton_vlm_request_errors_total", 'kind="invalid_request"')


@pytest.mark.parametrize("case", ["corrupt image", "truncated mp4"])
def test_bad_input_is_refused_on_the_stream_and_server_keeps_serving(server, case):
    request, message = BAD[case]
    request = {"prompt": "describe", "max_tokens": 4, **request}
    errors = server_metric(server, *INVALID)
    with pytest.raises(InferenceServerException, match=re.escape(message)):
        stream(server.grpc_url, **request)
    assert server_metric(server, *INVALID) == errors + 1, "counted once, by the step that refused it"
    _good_request_still_works(server)


@pytest.mark.parametrize(("protocol", "status"), [("grpc", "StatusCode.INVALID_ARGUMENT"), ("http", "400")])
def test_unary_caller_gets_the_reason_and_its_code(server, protocol, status):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with pytest.raises(InferenceServerException, match="invalid request: image 0 could not be decoded") as err:
        infer(url, protocol=protocol, prompt="describe", images=[b"\x89PNG broken"], max_tokens=4)
    assert err.value.status() == status  # not INTERNAL / 500: the request's own fault
    _good_request_still_works(server)


def test_wrong_tensor_dtype_is_refused_by_name(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = build_inputs(grpcclient, prompt="hello")
    wrong = grpcclient.InferInput("max_tokens", [1], "FP32")
    wrong.set_data_from_numpy(np.array([4.0], dtype=np.float32))
    with pytest.raises(InferenceServerException, match="max_tokens.*(INT32|FP32)|(INT32|FP32).*max_tokens"):
        client.infer("vlm_unary", [*inputs, wrong])
    client.close()
    _good_request_still_works(server)


def test_neither_text_nor_messages_is_refused(server):
    with pytest.raises(InferenceServerException, match="exactly one of 'text_input' or 'messages'"):
        stream(server.grpc_url, images=[make_image(64, 64)], max_tokens=4)
    _good_request_still_works(server)
