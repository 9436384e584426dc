"""Requests a user could send that must each be refused with a clear error naming their fault: {case: (the
request's `vlm` inputs, as `client.request_tensors` takes them, a phrase of the error)}. The unit tests run every
case through `Preprocessor` (tests/unit/test_bad_requests.py); test_bad_input.py sends some through a server."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from tests.conftest import make_image
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
