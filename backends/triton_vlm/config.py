"""One frozen config per component, built from config.pbtxt string `parameters`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from . import env
from .errors import InvalidRequest


def read_parameters(model_config: dict) -> dict[str, str]:
    """config.pbtxt `parameters { key: "k" value: { string_value: "v" } }` -> {"k": "v"}."""
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def _model_path(params: dict[str, str]) -> Path:
    return Path(params.get("model_path") or env.default_model_path())


def torch_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


BACKEND_KEYS = frozenset({"FORCE_CPU_ONLY_INPUT_TENSORS", "EXECUTION_ENV_PATH"})  # the python backend's own
_BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _typed(cls, params: dict[str, str], shared: tuple = (), **extra):
    """Build `cls` from config.pbtxt parameters, each converted to its field's type. A key that is no field
    of `cls` (nor of the `shared` configs built from the same parameters, nor the python backend's own),
    or a value of the wrong type, fails with a ValueError that names it: a misspelt or retired setting is
    an error at load, not a default silently kept."""
    known = {f.name for c in (cls, *shared) for f in fields(c)}
    unknown = sorted(set(params) - known - BACKEND_KEYS)
    if unknown:
        raise ValueError(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in "
                         f"config.pbtxt; this model takes {', '.join(sorted(known))}")
    values = {}
    for f in fields(cls):
        if f.name in params and params[f.name] != "" and f.name not in extra:
            kind = type(f.default) if f.default is not None else str
            raw = params[f.name]
            try:
                values[f.name] = _BOOLEANS[raw.strip().lower()] if kind is bool else kind(raw)
            except (KeyError, ValueError):
                expected = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, kind.__name__)
                raise ValueError(f"parameter {f.name!r} in config.pbtxt must be {expected}, got {raw!r}") from None
    return cls(**values, **extra)


SERVE = "serve"  # field metadata: a knob `triton-vlm serve` takes as a flag, its value its help
CHOICES = "choices"  # field metadata: the values a knob takes (checked when the config is built)
MODELS = "models"  # field metadata: the repository's models whose parameters carry the knob
LANGUAGE_MODE = "language_mode"  # field metadata: a knob of E/PD language servers (`--mode language`) only


def knob(default, help: str, models: tuple[str, ...], choices: tuple = (), language_mode: bool = False):
    """A field that `triton-vlm serve` takes as a flag and `Deployment` as a field (`serve_knobs`): declared
    once, here, with its default, its help, its choices and the models that get it."""
    return field(default=default, metadata={SERVE: help, MODELS: models, CHOICES: choices,
                                            LANGUAGE_MODE: language_mode})


def serve_knobs(cls) -> list:
    """The fields of `cls` that are `serve` flags (and `Deployment` fields), in declaration order."""
    return [f for f in fields(cls) if SERVE in f.metadata]


_MEDIA = ("preprocess", "image_encoder")  # the models that read image and video files


@dataclass(frozen=True)
class PreprocessConfig:
    model_path: Path = field(default_factory=env.default_model_path)
    max_images: int = 8
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 64 * 2**20
    allow_private_urls: bool = False
    url_timeout_s: float = 10.0
    max_model_len: int = 0  # 0: the model's max_position_embeddings
    image_processing: str = "local"  # local: pixels out | remote: image files out (E/PD encoder servers)
    # video limits (`serve --max-video-frames` etc.); each is a 400 before any frame is decoded
    max_videos: int = knob(2, "videos per request", _MEDIA)
    max_video_bytes: int = knob(64 * 2**20, "bytes of one video file", _MEDIA)
    max_video_frames: int = knob(256, "frames sampled from one video (more: a 400 saying to send max_frames)", _MEDIA)
    max_video_seconds: float = knob(600.0, "duration of one video", _MEDIA)
    max_video_tokens: int = knob(16384, "prompt tokens of a request's videos, all together", _MEDIA)
    max_video_fps: float = knob(8.0, "the sampling rate a request may ask for (mm_processor_kwargs fps)", _MEDIA)
    video_decode_timeout_s: float = knob(30.0, "seconds to decode one video's sampled frames", _MEDIA)

    def __post_init__(self) -> None:
        if self.image_processing not in ("local", "remote"):
            raise ValueError(f"image_processing must be local or remote, got {self.image_processing!r}")
        _check_knobs(self)

    @classmethod
    def from_parameters(cls, params: dict[str, str], shared: tuple = ()) -> PreprocessConfig:
        """`shared`: the other configs built from the same parameters (image_encoder: EncodeConfig)."""
        if env.allow_private_urls():
            params = {**params, "allow_private_urls": "true"}
        return _typed(cls, params, shared, model_path=_model_path(params))

    def check_image_count(self, count: int, videos: int = 0) -> None:
        if count > self.max_images:
            raise InvalidRequest(f"{count} images sent; the limit is {self.max_images} per request")
        if videos > self.max_videos:
            raise InvalidRequest(f"{videos} videos sent; the limit is {self.max_videos} per request")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class EncoderConfig:
    model_path: Path = field(default_factory=env.default_model_path)
    device: str = "cpu"
    dtype: str = "auto"
    threads: int = 0  # torch intra-op threads per instance; 0: the cores divided by the instances

    @classmethod
    def from_parameters(cls, params: dict[str, str], device: str = "cpu", instances: int = 1) -> EncoderConfig:
        config = _typed(cls, params, model_path=_model_path(params), device=device)
        if config.threads <= 0:
            config = replace(config, threads=max(1, usable_cores() // max(1, instances)))
        return config


def _check_knobs(config) -> None:
    for f in serve_knobs(type(config)):
        value = getattr(config, f.name)
        if f.metadata[CHOICES] and value not in f.metadata[CHOICES]:
            raise ValueError(f"{f.name} must be one of {', '.join(map(str, f.metadata[CHOICES]))}, got {value!r}")
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ValueError(f"{f.name} must be >= 0, got {value}")


_ENCODE = ("encode",)
_CACHE = ("encode", "image_encoder")  # an E/PD encoder server's image_encoder keeps embeddings too


@dataclass(frozen=True)
class EncodeConfig:
    """The encode stage: how many shards a request's images may be split into (= vision_encoder instances)."""

    model_path: Path = field(default_factory=env.default_model_path)
    data_parallel: int = 1
    encoder_urls: str = ""  # E/PD: comma-separated gRPC addresses of encoder servers; "" = encode here
    encoder_urls_file: str = ""  # E/PD: a file listing them, watched while serving (live scaling)
    encoder_timeout_s: float = 60.0
    # The stage's knobs: `serve --encoder-transport` etc. and `Deployment`'s fields come from these (`SERVE`)
    encoder_fallback: str = knob("local", "encode here when every encoder server fails", _ENCODE,
                                 choices=("local", "none"), language_mode=True)
    encoder_transport: str = knob("auto", "how embeddings come back; auto: system shared memory from encoders "
                                  "on loopback addresses, gRPC tensors from the others", _ENCODE,
                                  choices=("auto", "grpc", "shm"), language_mode=True)
    local_encode_below: int = knob(0, "encode requests with fewer pixel rows (patches; InternVL: tiles) here, not "
                                   "on the encoder servers (0: send every image request out)", _ENCODE,
                                   language_mode=True)
    embedding_cache_mb: int = knob(512, "image embeddings kept by image content, so a repeated image skips the "
                                   "encoder (0: off)", _CACHE)
    embedding_cache_redis: str = knob("", "redis://HOST:PORT: a Redis that servers share embeddings through (a "
                                      "slow or absent Redis is bypassed, never an error)", _CACHE)

    def __post_init__(self) -> None:
        _check_knobs(self)

    @property
    def remote_encoders(self) -> list[str]:
        return [u.strip() for u in self.encoder_urls.split(",") if u.strip()]

    @classmethod
    def from_parameters(cls, params: dict[str, str], shared: tuple = ()) -> EncodeConfig:
        return _typed(cls, params, shared, model_path=_model_path(params))


_LANGUAGE = ("language_model",)


@dataclass(frozen=True)
class LanguageConfig:
    model_path: Path = field(default_factory=env.default_model_path)
    device: str = "cpu"  # rank 0's; rank r of a GPU deployment uses the r-th GPU after it
    dtype: str = "auto"
    threads: int = 0  # torch threads per rank; 0: the cores divided by the ranks
    max_model_len: int = 0
    tensor_parallel: int = 1
    # The engine's knobs: `serve --max-num-seqs` etc. and `Deployment`'s fields come from these (`SERVE`)
    max_num_seqs: int = knob(8, "sequences prefilled or decoded at once; more wait in the queue", _LANGUAGE)
    kv_cache_mb: int = knob(1024, "KV-cache pool per tensor-parallel rank, in MiB; never more than --max-num-seqs "
                            "full-length sequences take", _LANGUAGE)
    block_size: int = knob(16, "tokens per KV-cache block", _LANGUAGE)
    max_num_batched_tokens: int = knob(512, "tokens one engine step computes: running decodes first, then prompt "
                                       "chunks, so long prompts do not stall streams", _LANGUAGE)
    enable_prefix_caching: bool = knob(True, "reuse the KV blocks of earlier prompts' equal prefixes, images told "
                                       "apart by content", _LANGUAGE)
    # E/P/D: a decode server prefills its prompts on these prefill servers (`engine/remote_prefill.py`)
    prefill_urls: str = ""  # comma-separated gRPC addresses; "" = prefill here
    prefill_urls_file: str = ""  # a file listing them, watched while serving
    prefill_timeout_s: float = 60.0
    local_prefill_below: int = knob(0, "decode mode: prefill prompts with fewer uncached tokens than this here, "
                                    "not on the prefill servers (0: send every prompt out)", _LANGUAGE)
    kv_transport: str = knob("grpc", "how a prompt's KV moves from prefill to decode servers: grpc (inside the "
                             "answer) or nixl (written into the decode server's memory; decode and prefill "
                             "servers both need it, and fail at start if NIXL cannot start)", _LANGUAGE,
                             choices=("grpc", "nixl"))

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "kv_cache_mb", "block_size", "max_num_batched_tokens", "tensor_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_transport not in ("grpc", "nixl"):
            raise ValueError(f"kv_transport must be grpc or nixl, got {self.kv_transport!r}")
        if self.local_prefill_below < 0:
            raise ValueError(f"local_prefill_below must be >= 0, got {self.local_prefill_below}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                             f"max_num_seqs ({self.max_num_seqs}): every running sequence decodes each step")

    @property
    def remote_prefills(self) -> list[str]:
        return [u.strip() for u in self.prefill_urls.split(",") if u.strip()]

    @classmethod
    def from_parameters(cls, params: dict[str, str], device: str = "cpu") -> LanguageConfig:
        # its one KIND_CPU instance places the model itself: parameter `device` (e.g. "cuda:0")
        return _typed(cls, params, model_path=_model_path(params), device=params.get("device") or device)
