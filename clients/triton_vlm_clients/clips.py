"""Video clips made with PyAV, for tests and benchmarks: moving coloured shapes over noise, so that frames
differ, in a real container and codec (MP4 + MPEG-4 Part 2 by default)."""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np


def frames(count: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """[count, height, width, 3] uint8: a square moving across a noisy gradient that drifts in colour."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 64, (height, width, 3), dtype=np.uint8)
    y, x = np.mgrid[0:height, 0:width]
    out = np.empty((count, height, width, 3), np.uint8)
    for i in range(count):
        frame = base.copy()
        frame[..., 0] += ((x * 191) // max(1, width - 1)).astype(np.uint8)
        frame[..., 1] += np.uint8((i * 37 + seed * 11) % 160)
        frame[..., 2] += ((y * 191) // max(1, height - 1)).astype(np.uint8)
        side = max(1, min(width, height) // 3)
        left, top = (i * 7) % max(1, width - side + 1), (i * 5) % max(1, height - side + 1)
        frame[top:top + side, left:left + side] = (255 - 20 * (seed % 5), 40 * (i % 6), 200)
        out[i] = frame
    return out


def make_clip(seconds: float = 3.0, fps: float = 8.0, width: int = 128, height: int = 96, seed: int = 0,
              container: str = "mp4", codec: str = "mpeg4") -> bytes:
    """An encoded video file of `seconds * fps` frames."""
    import av

    buffer = io.BytesIO()
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "3"} if codec == "mpeg4" else {}
        for array in frames(round(seconds * fps), width, height, seed):
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def y4m(width: int, height: int, count: int, fps: int = 25) -> bytes:
    """A raw YUV4MPEG2 video: its header says any size, cheaply (grey frames; no frame is built when
    `count` is 0, so a header claiming 100000x100000 costs its header only)."""
    header = f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 Cmono\n".encode()
    return header + (b"FRAME\n" + b"\x80" * (width * height)) * count if count else header
