"""Turn one video file into checked frames with PyAV: its header first (`probe`: size, frame count, frame
rate, duration, each checked against the limits before any frame is decoded), then only the frames a
family samples (`decode`), under a whole-decode deadline. Every failure is the request's: InvalidRequest
naming the video and the problem."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidRequest
from .url_fetch import FetchPolicy


@dataclass(frozen=True)
class VideoLimits:
    max_bytes: int = 64 * 2**20  # the file
    max_frames: int = 256  # frames sampled from one video (what the encoder sees)
    max_seconds: float = 600.0  # the video's duration
    max_pixels: int = 4096 * 4096  # one frame's width * height as the header says, before resizing
    max_source_frames: int = 100_000  # frames the container holds (decoding walks up to the last sampled one)
    decode_timeout_s: float = 30.0  # the whole decode of one video
    fetch: FetchPolicy = field(default_factory=FetchPolicy)

    @classmethod
    def of(cls, config) -> VideoLimits:
        """The limits a `config.PreprocessConfig` sets."""
        fetch = FetchPolicy(timeout_s=config.url_timeout_s, max_bytes=config.max_video_bytes,
                            allow_private=config.allow_private_urls)
        return cls(max_bytes=config.max_video_bytes, max_frames=config.max_video_frames,
                   max_seconds=config.max_video_seconds, max_pixels=config.max_image_pixels,
                   decode_timeout_s=config.video_decode_timeout_s, fetch=fetch)


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header says (transformers' `VideoMetadata` as its PyAV loader fills it)."""

    frames: int
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.frames / self.fps if self.fps else 0.0


def _open(data: bytes, index: int):
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError) as e:  # FFmpeg itself refuses frames over 2**28 pixels here
        raise InvalidRequest(f"video {index} could not be opened: not a video, truncated or corrupt, or a frame "
                             f"size FFmpeg refuses ({getattr(e, 'strerror', None) or e})") from None
    if not container.streams.video:
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
        container.close()
        raise InvalidRequest(f"video {index} has no video stream (streams: {kinds})")
    return container


def probe(data: bytes, index: int, limits: VideoLimits) -> VideoInfo:
    """Check a video file's header against the limits; decode nothing. The frame count is the container's
    (as transformers reads it), else counted from its packets."""
    if not data:
        raise InvalidRequest(f"video {index} is empty")
    if len(data) > limits.max_bytes:
        raise InvalidRequest(f"video {index} is {len(data)} bytes; the limit is {limits.max_bytes}")
    container = _open(data, index)
    try:
        stream = container.streams.video[0]
        width, height = int(stream.width or 0), int(stream.height or 0)
        if width <= 0 or height <= 0:
            raise InvalidRequest(f"video {index} does not say its frame size")
        if width * height > limits.max_pixels:
            raise InvalidRequest(f"video {index} is {width}x{height}; the limit is {limits.max_pixels} pixels a frame")
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if not 0 < fps <= 1000:
            raise InvalidRequest(f"video {index} has no usable frame rate ({fps})")
        frames = int(stream.frames or 0)
        if frames > limits.max_source_frames:
            raise InvalidRequest(f"video {index} claims {frames} frames; the limit is {limits.max_source_frames}")
        if frames == 0:  # not in the header (e.g. WebM, Y4M): count the packets, decoding nothing
            frames = _count_packets(container, index, limits)
        info = VideoInfo(frames, fps, width, height)
        if info.duration > limits.max_seconds:
            raise InvalidRequest(f"video {index} is {info.duration:.1f}s long; the limit is {limits.max_seconds:g}s")
        return info
    finally:
        container.close()


def _count_packets(container, index: int, limits: VideoLimits) -> int:
    import av

    frames = 0
    try:
        for packet in container.demux(video=0):
            frames += packet.size > 0
            if frames > limits.max_source_frames:
                raise InvalidRequest(f"video {index} has over {limits.max_source_frames} frames")
    except av.FFmpegError as e:
        raise InvalidRequest(f"video {index} is corrupt: {e}") from None
    if frames == 0:
        raise InvalidRequest(f"video {index} holds no frames")
    return frames


def decode(data: bytes, indices: np.ndarray, index: int, limits: VideoLimits) -> np.ndarray:
    """The frames at `indices` (ascending, in decode order, as transformers' PyAV loader takes them)
    -> [len(indices), H, W, 3] uint8 RGB. A video that ends early or takes over the deadline fails."""
    import av

    wanted = np.asarray(indices, np.int64)
    deadline = time.monotonic() + limits.decode_timeout_s
    picked: list[np.ndarray] = []
    container = _open(data, index)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        last, at = int(wanted[-1]), 0
        for i, frame in enumerate(container.decode(stream)):
            if time.monotonic() > deadline:
                raise InvalidRequest(f"video {index} took longer than {limits.decode_timeout_s:g}s to decode")
            if i > last:
                break
            while at < len(wanted) and wanted[at] == i:  # an index sampled twice gives the frame twice
                picked.append(frame.to_ndarray(format="rgb24"))
                at += 1
    except av.FFmpegError as e:
        raise InvalidRequest(f"video {index} is corrupt: {e}") from None
    finally:
        container.close()
    if len(picked) < len(wanted):
        raise InvalidRequest(f"video {index} ended after {len(picked)} of the {len(wanted)} frames sampled "
                             f"(up to frame {last}): truncated or corrupt")
    return np.stack(picked)
