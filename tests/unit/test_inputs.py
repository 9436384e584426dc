"""Image sources, chat messages and request tensors: what is accepted and what is refused."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_image
from triton_vlm.errors import InvalidRequest
from triton_vlm.preprocess.chat import Media, build_conversation
from triton_vlm.preprocess.images import ImageLimits, load_image
from triton_vlm.protocol import GenerateRequest, SamplingParams, request_from_arrays


def test_raw_bytes_and_data_urls_decode_to_the_same_picture():
    raw = make_image(40, 30)
    url = b"data:image/png;base64," + base64.b64encode(raw)
    a, b = load_image(raw, 0, ImageLimits()), load_image(url, 0, ImageLimits())
    assert a.size == (40, 30) and a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))


def test_decompression_bomb_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")  # a few KB, 25 MP
    with pytest.raises(InvalidRequest, match="5000x5000; the limit is 1000000 pixels"):
        load_image(buf.getvalue(), 0, ImageLimits(max_pixels=1_000_000))


def test_byte_cap():
    with pytest.raises(InvalidRequest, match="the limit is 10"):
        load_image(make_image(40, 30), 2, ImageLimits(max_bytes=10))


def test_text_input_puts_images_first_then_videos():
    conv, sources = build_conversation(GenerateRequest(text_input="hi", images=[b"a", b"b"], videos=[b"v"]))
    assert conv == [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "video"},
                                                 {"type": "text", "text": "hi"}]}]
    assert sources == [Media("image", b"a"), Media("image", b"b"), Media("video", b"v")]


def test_messages_take_urls_and_image_and_video_parts_in_order():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/1.png"}},
                                     {"type": "video"}, {"type": "image"},
                                     {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AA=="}},
                                     {"type": "text", "text": "compare"}]},
    ]
    conv, sources = build_conversation(GenerateRequest(messages=json.dumps(messages), images=[b"raw"],
                                                       videos=[b"clip"]))
    assert sources == [Media("image", b"https://x/1.png"), Media("video", b"clip"), Media("image", b"raw"),
                       Media("video", b"data:video/mp4;base64,AA==")]
    assert [part["type"] for part in conv[1]["content"]] == ["image", "video", "image", "video", "text"]


@pytest.mark.parametrize("messages, error", [
    ("not json", "not valid JSON"),
    ("[]", "non-empty JSON list"),
    ('[{"role": "robot", "content": "x"}]', "needs a 'role'"),
    ('[{"role": "user", "content": [{"type": "video_url"}]}]', "a 'video_url' part needs"),
    ('[{"role": "user", "content": [{"type": "image"}]}]', "more 'image' parts"),
    ('[{"role": "user", "content": [{"type": "video"}]}]', "more 'video' parts"),
])
def test_bad_messages(messages, error):
    with pytest.raises(InvalidRequest, match=error):
        build_conversation(GenerateRequest(messages=messages))


def test_request_tensors_override_the_model_defaults():
    defaults = SamplingParams(temperature=0.7, top_p=0.9)
    req = request_from_arrays({"text_input": np.array([b"hi"], dtype=object),
                               "max_tokens": np.array([5], np.int32), "stream": np.array([True])}, defaults)
    assert req.sampling == SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, stream=True)


@pytest.mark.parametrize("arrays, error", [
    ({"text_input": np.array([b"\xff\xfe"], dtype=object)}, "not valid UTF-8"),
    ({"text_input": np.array([b"a", b"b"], dtype=object)}, "exactly one string"),
    ({"text_input": np.array([b"a"], dtype=object), "seed": np.array([-1], np.int32)}, "seed must be"),
    ({"text_input": np.array([b"a"], dtype=object), "top_k": np.array([-2], np.int32)}, "top_k must be"),
    ({"text_input": np.array([b"a"], dtype=object), "temperature": np.array([np.nan], np.float32)}, "temperature"),
])
def test_bad_request_tensors(arrays, error):
    with pytest.raises(InvalidRequest, match=error):
        request_from_arrays(arrays, SamplingParams())


def test_private_urls_can_be_allowed_by_parameter_or_environment(monkeypatch):
    from triton_vlm.config import PreprocessConfig

    assert not ImageLimits.of(PreprocessConfig.from_parameters({})).fetch.allow_private
    assert ImageLimits.of(PreprocessConfig.from_parameters({"allow_private_urls": "true"})).fetch.allow_private
    monkeypatch.setenv("TRITON_VLM_ALLOW_PRIVATE_URLS", "1")
    assert ImageLimits.of(PreprocessConfig.from_parameters({"allow_private_urls": "false"})).fetch.allow_private
