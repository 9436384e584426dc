"""A request's videos on their way to the vision encoder: each is planned from its header (which frames,
what size, its layout and tokens; every limit checked), then its sampled frames are decoded and made into
patch rows by the family's `VideoRules`. A video is then one more layout row (t temporal patches of
h x w), encoded as t pieces (`Family.pieces`), so its frames spread over the encoder replicas."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from ..errors import InvalidRequest
from ..models.video import VideoPlan
from ..protocol import VideoSampling
from .videos import VideoLimits, decode, probe

ENVELOPE = b"triton-vlm video\n"  # E/PD: a video file on its way to an encoder server, with its plan


class VideoProcessing:
    def __init__(self, family, config) -> None:
        """`config`: the `PreprocessConfig` whose limits apply."""
        self.family, self.config, self.limits = family, config, VideoLimits.of(config)
        self.rules = family.video_rules() if family.video_token_id is not None else None

    def plan(self, data: bytes, index: int, sampling: VideoSampling) -> VideoPlan:
        """Read the header and settle the frames, size and layout; decode nothing."""
        if self.rules is None:
            raise InvalidRequest(f"{self.family.model_type} models do not take video input")
        c = self.config
        if sampling.fps is not None and sampling.fps > c.max_video_fps:
            raise InvalidRequest(f"mm_processor_kwargs fps {sampling.fps:g} is over the limit of {c.max_video_fps:g}")
        if sampling.max_frames is not None and sampling.max_frames > c.max_video_frames:
            raise InvalidRequest(f"mm_processor_kwargs max_frames {sampling.max_frames} is over the limit of "
                                 f"{c.max_video_frames}")
        info = probe(data, index, self.limits)
        try:
            plan = self.rules.plan(info, sampling.fps, sampling.max_frames)
        except ValueError as e:
            raise InvalidRequest(f"video {index} ({info.width}x{info.height}, {info.frames} frames at "
                                 f"{info.fps:g} fps) cannot be used: {e}") from None
        if len(plan.indices) > c.max_video_frames:
            raise InvalidRequest(f"video {index} samples to {len(plan.indices)} frames; the limit is "
                                 f"{c.max_video_frames} (send mm_processor_kwargs max_frames or a lower fps)")
        return plan

    def check_tokens(self, tokens: int) -> None:
        if tokens > self.config.max_video_tokens:
            raise InvalidRequest(f"the videos make {tokens} prompt tokens; the limit is {self.config.max_video_tokens}"
                                 " (send a lower fps or max_frames in mm_processor_kwargs)")

    def pixels(self, data: bytes, index: int, plan: VideoPlan) -> tuple[np.ndarray, np.ndarray]:
        """Decode the planned frames (on the caller's thread: an I/O thread) -> (pixel_values, layout [1, 3])."""
        pixels, grid = self.rules.pixels(decode(data, plan.indices, index, self.limits), plan)
        if tuple(grid[0]) != plan.layout:  # the plan and the processing disagree: a bug
            raise RuntimeError(f"video {index}: planned layout {plan.layout} != processed {grid[0].tolist()}")
        return pixels, grid


def video_key(fingerprint: bytes, data: bytes, plan: VideoPlan) -> bytes:
    """A video's content key covers its file and how it was sampled (frames, size, rate)."""
    h = hashlib.blake2b(data, digest_size=16, key=fingerprint)
    h.update(json.dumps([plan.indices.tolist(), plan.height, plan.width, plan.fps]).encode())
    return b"v" + h.hexdigest().encode()


def wrap(data: bytes, plan: VideoPlan) -> bytes:
    """A video file with its plan, as it travels to an encoder server (among the `_IMAGES` files)."""
    head = dict(indices=plan.indices.tolist(), height=plan.height, width=plan.width, layout=list(plan.layout),
                source_fps=plan.source_fps, fps=plan.fps)
    return ENVELOPE + json.dumps(head).encode() + b"\n" + data


def is_wrapped(file: bytes) -> bool:
    return file[:len(ENVELOPE)] == ENVELOPE


def unwrap(file: bytes, index: int, videos: VideoProcessing) -> tuple[bytes, VideoPlan]:
    """A wrapped video -> (its file, its plan), the plan checked against the file's header, this server's
    limits and the family's rules (a client can call an encoder server directly)."""
    try:
        head, data = file[len(ENVELOPE):].split(b"\n", 1)
        plan = json.loads(head)
        indices = np.asarray(plan["indices"], np.int64)
        height, width, layout = int(plan["height"]), int(plan["width"]), tuple(int(x) for x in plan["layout"])
        fps, source_fps = float(plan["fps"]), float(plan["source_fps"])
    except (ValueError, KeyError, TypeError):
        raise InvalidRequest(f"video {index}: a malformed video envelope") from None
    info = probe(data, index, videos.limits)
    if videos.rules is None:
        raise InvalidRequest(f"{videos.family.model_type} models do not take video input")
    tp, p = videos.rules.config.temporal_patch_size, videos.rules.config.patch_size
    ok = (0 < len(indices) <= videos.config.max_video_frames and indices.min() >= 0 and indices.max() < info.frames
          and bool(np.all(np.diff(indices) >= 0)) and source_fps == info.fps
          and (height, width) == tuple(videos.rules.size(len(indices), info.height, info.width))
          and layout == (-(-len(indices) // tp), height // p, width // p))
    if not ok:
        raise InvalidRequest(f"video {index}: its plan does not fit the video or this server's limits")
    return data, VideoPlan(indices, height, width, layout, source_fps, fps)
