"""Bad input gets a clear error for that request alone; the next good request is served."""

from __future__ import annotations

import functools
import io
import json
import re
import struct
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.conftest import make_image, server_metric
from triton_vlm_clients import stages
from triton_vlm_clients.client import build_inputs, infer, stream
from triton_vlm_clients.clips import make_clip, y4m


def _tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="TIFF")
    return buf.getvalue()


def _huge_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (9000, 8000)).save(buf, format="PNG")  # ~70 KB on the wire, 72 million pixels
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header says width x height (a bomb by its header: Pillow refuses to open it)."""
    data = bytearray(make_image(8, 8, fmt="PNG"))
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height, then its CRC over type + data
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _audio_only() -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    return buffer.getvalue()


CLIP = make_clip(seconds=1.0)
BAD = {
    "truncated mp4": (dict(videos=[CLIP[:len(CLIP) // 2]]), "video 0 could not be opened: not a video, truncated"),
    "10000-frame 1x1 clip": (dict(videos=[y4m(1, 1, 10_000)]), "video 0 samples to 768 frames; the limit is 256"),
    "header claiming 100000x100000": (dict(videos=[y4m(100_000, 100_000, 0)]), "a frame size FFmpeg refuses"),
    "header claiming 10000x10000": (dict(videos=[y4m(10_000, 10_000, 0)]),
                                    "video 0 is 10000x10000; the limit is 67108864 pixels a frame"),
    "audio-only file": (dict(videos=[_audio_only()]), "video 0 has no video stream (streams: audio)"),
    "video longer than the limit": (dict(videos=[y4m(2, 2, 601, fps=1)]), "video 0 is 601.0s long; the limit is 600s"),
    "not a video": (dict(videos=[b"hello, this is text" * 10]), "video 0 could not be opened"),
    "video data URL not a video": (dict(videos=[b"data:image/png;base64,aGVsbG8="]),
                                   "video 0: the data: URL's media type is 'image/png'; it must be video/*"),
    "video fps over the limit": (dict(videos=[CLIP], mm_processor_kwargs={"fps": 100}),
                                 "mm_processor_kwargs fps 100 is over the limit of 8"),
    "video max_frames over the limit": (dict(videos=[CLIP], mm_processor_kwargs={"max_frames": 1000}),
                                        "max_frames 1000 is over the limit of 256"),
    "unknown mm_processor_kwargs": (dict(videos=[CLIP], mm_processor_kwargs={"size": 3}),
                                    "'mm_processor_kwargs' takes fps and max_frames, not size"),
    "too many videos": (dict(videos=[CLIP] * 3), "3 videos sent; the limit is 2"),
    "huge image": (dict(images=[_huge_png()]), "9000x8000; the limit is 67108864 pixels"),
    "messages not JSON": (dict(prompt=None, messages="[{"), "'messages' is not valid JSON"),
    "messages not a list": (dict(prompt=None, messages='"hello"'), "must be a non-empty JSON list"),
    "corrupt image": (dict(images=[make_image(64, 64)[:200]]), "could not be decoded"),
    "not an image": (dict(images=[b"hello, this is text"]), "could not be decoded"),
    "empty image entry": (dict(images=[make_image(64, 64), b""]), "image 1 is empty"),
    "unsupported format": (dict(images=[_tiff()]), "unsupported format TIFF"),
    "too many images": (dict(images=[make_image(32, 32)] * 9), "9 images sent; the limit is 8"),
    "prompt longer than context": (dict(prompt="red " * 4000, images=[make_image(640, 480)]),
                                   "model context is 4096"),
    "max_tokens zero": (dict(max_tokens=0), "max_tokens must be > 0"),
    "max_tokens negative": (dict(max_tokens=-5), "max_tokens must be > 0"),
    "bad temperature": (dict(temperature=-1.0), "temperature must be >= 0"),
    "bad top_p": (dict(top_p=1.5), "top_p must be in (0, 1]"),
    "file URL": (dict(images=[b"file:///etc/passwd"]), "scheme 'file' is not allowed"),
    "loopback URL": (dict(images=[b"http://127.0.0.1:1/cat.png"]), "non-public address"),
    "bad data URL": (dict(images=[b"data:image/png;base64,@@@"]), "not valid base64"),
    "empty stop string": (dict(stop=["ok", ""]), "stop: at most 16 non-empty strings"),
    "deeply nested messages": (dict(prompt=None, messages="[" * 100000), "'messages' is too deeply nested"),
    "data URL not an image": (dict(images=[b"data:text/plain;base64,aGVsbG8="]), "media type is 'text/plain'"),
    "too many stop strings": (dict(stop=[str(i) for i in range(17)]), "stop: at most 16 non-empty strings"),
    "min_tokens over max_tokens": (dict(max_tokens=4, min_tokens=5), "min_tokens must be in [0, max_tokens=4]"),
    "header claiming 30000x30000": (dict(images=[_png_claiming(30000, 30000)]),
                                    "image 0 is over the limit of 67108864 pixels"),
    "lone surrogate in a message": (dict(prompt=None, messages='[{"role": "user", "content": "hi \\ud800"}]'),
                                    "a lone UTF-16 surrogate"),
    "messages without the chat template": (dict(prompt=None, messages='[{"role": "user", "content": "hi"}]',
                                                chat_template=False), "'chat_template' false needs 'text_input'"),
}


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


@pytest.mark.parametrize("case", BAD)
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
