"""Video frames -> patch rows, as transformers' (fast, torchvision) video processors of the patch-grid
families make them, with torch alone: each family's `VideoRules` samples frames and picks the size by its
own rules; `VideoConfig` reads the checkpoint's video processor settings; `resize` is torchvision's, and
`patchify` normalizes, pads to whole temporal patches and lays the patches out as Qwen's and GLM's vision
towers read them."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def write_video_config(out: Path, processor: str, patch_size: int, min_pixels: int, max_pixels: int,
                       image_mean, image_std, fps: float = 2.0) -> None:
    """A tiny checkpoint's `video_preprocessor_config.json`, as transformers saves one (frames sampled)."""
    (Path(out) / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": processor, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "do_convert_rgb": True, "resample": 3, "image_mean": list(image_mean),
        "image_std": list(image_std), "patch_size": patch_size, "temporal_patch_size": 2, "merge_size": 2,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}, "do_sample_frames": True, "fps": fps,
        "min_frames": 4, "max_frames": 768,
    }, indent=2) + "\n")


@dataclass(frozen=True)
class VideoConfig:
    """A video processor's settings: the family's class defaults, then the checkpoint's
    `video_preprocessor_config.json` (else its `preprocessor_config.json`, as transformers falls back)."""

    min_pixels: int
    max_pixels: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    fps: float | None = 2.0
    num_frames: int | None = None
    min_frames: int = 4
    max_frames: int = 768

    @classmethod
    def load(cls, path: Path, **defaults) -> VideoConfig:
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            if (path / name).exists():
                saved = json.loads((path / name).read_text())
                break
        else:
            saved = {}
        size = saved.get("size") or {}
        if "shortest_edge" in size and "longest_edge" in size:  # `size` in pixels; min/max_pixels win over it
            saved = {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"], **saved}
        names = {f.name for f in fields(cls)}
        values = {**defaults, **{k: v for k, v in saved.items() if k in names and v is not None}}
        for name in ("image_mean", "image_std"):
            values[name] = tuple(values.get(name, getattr(cls, name)))
        return cls(**values)


def resize(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """[T, H, W, 3] uint8 -> [T, 3, height, width] uint8, as torchvision's `resize` (bicubic, antialiased) does
    on CPUs for the fast processors: torch's native uint8 kernel."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    if video.shape[-2:] == (height, width):
        return video.contiguous()
    return torch.nn.functional.interpolate(video, size=[height, width], mode="bicubic", align_corners=False,
                                           antialias=True)


def patchify(video: torch.Tensor, config: VideoConfig) -> tuple[np.ndarray, np.ndarray]:
    """[T, 3, H, W] uint8 (resized) -> (pixel_values [t*h*w, 3*tp*p*p] float32, grid [1, 3] (t, h, w)):
    rescaled and normalized in one step as transformers fuses them, the last frame repeated up to whole
    temporal patches, the patches in merge-window order."""
    p, tp, m = config.patch_size, config.temporal_patch_size, config.merge_size
    mean = torch.tensor(config.image_mean) * (1.0 / config.rescale_factor)
    std = torch.tensor(config.image_std) * (1.0 / config.rescale_factor)
    x = (video.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    if x.shape[0] % tp:
        x = torch.cat([x, x[-1:].repeat(tp - x.shape[0] % tp, 1, 1, 1)])
    t, c, height, width = x.shape[0] // tp, x.shape[1], x.shape[2], x.shape[3]
    h, w = height // p, width // p
    x = x.view(t, tp, c, h // m, m, p, w // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, c * tp * p * p).numpy(), np.asarray([[t, h, w]], np.int64)


def uniform_indices(total: int, count: int) -> np.ndarray:
    """transformers' default sampler: `torch.arange(0, total, total / count).int()`."""
    return torch.arange(0, total, total / count).int().numpy().astype(np.int64)


@dataclass(frozen=True)
class VideoPlan:
    """One video as its header and the request's sampling settle it, before any frame is decoded."""

    indices: np.ndarray  # the frames to decode, in order
    height: int  # every frame resized to this
    width: int
    layout: tuple[int, int, int]  # (t, h, w) in patches: t temporal patches of h x w
    source_fps: float  # the video's own frame rate (timestamps)
    fps: float  # the sampling rate asked for, else the checkpoint's (Qwen2.5-VL's M-RoPE time axis reads it)


class VideoRules:
    """A family's video processor: how many frames and which (`sample`), at what size (`size`), and the
    prompt text a video becomes (`expand`). Subclasses copy their transformers processor's rules."""

    defaults: dict = {}  # the transformers video processor's class defaults

    def __init__(self, path: Path, merge_size: int) -> None:
        self.config, self.merge_size = VideoConfig.load(Path(path), **self.defaults), merge_size

    def plan(self, info, fps: float | None = None, max_frames: int | None = None) -> VideoPlan:
        """`info`: the header (`preprocess.videos.VideoInfo`); `fps`, `max_frames`: the request's settings.
        Raises ValueError for a video the rules cannot use."""
        config = self.config if max_frames is None else dataclasses.replace(self.config, max_frames=max_frames)
        indices = self.sample(config, info, fps)
        if len(indices) == 0:
            raise ValueError("it samples to no frames")
        height, width = self.size(len(indices), info.height, info.width)
        p, tp = self.config.patch_size, self.config.temporal_patch_size
        layout = (math.ceil(len(indices) / tp), height // p, width // p)
        rate = fps if fps is not None else config.fps or 2.0
        return VideoPlan(np.asarray(indices, np.int64), height, width, layout, info.fps, float(rate))

    def pixels(self, frames: np.ndarray, plan: VideoPlan) -> tuple[np.ndarray, np.ndarray]:
        """The decoded frames [T, H, W, 3] uint8 -> (pixel_values, grid [1, 3])."""
        return patchify(resize(frames, plan.height, plan.width), self.config)

    def sample(self, config: VideoConfig, info, fps: float | None) -> np.ndarray:
        """The frame indices for the request's `fps` (None: the checkpoint's `num_frames` if it sets one,
        else its `fps`)."""
        raise NotImplementedError

    def size(self, frames: int, height: int, width: int) -> tuple[int, int]:
        raise NotImplementedError

    def expand(self, plan: VideoPlan, tokens: int) -> str:
        """The text the family's video placeholder becomes."""
        raise NotImplementedError

    def time_positions(self, temporal_patches: int, fps: float) -> np.ndarray | None:
        """The M-RoPE time positions of a video's temporal patches, from the video's start; None: each
        patch is a block of its own, positioned as an image (Qwen3-VL, GLM: timestamp text between them)."""
        return None
