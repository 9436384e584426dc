"""Typed requests that cross stage boundaries, each with `validate()`."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .errors import InvalidRequest

MAX_SEED = 2**31 - 1
SAMPLING_EPS = 1e-5  # temperatures below this sample greedily (vLLM's rule): 1/T would overflow the logits
MAX_STOPS, MAX_STOP_CHARS = 16, 256


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling, vLLM names. `temperature` 0 (below SAMPLING_EPS) means greedy."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stream: bool = False
    stop: tuple[str, ...] = ()  # stop strings: the output ends before the first one
    min_tokens: int = 0  # no end of sequence (EOS or stop string) before this many tokens
    ignore_eos: bool = False  # EOS does not end the output (benchmarks fix output lengths with it)
    video_fps: float = 0.0  # not token sampling: the rate the request's videos were sampled at (set by
    # preprocess; Qwen2.5-VL's M-RoPE time axis reads it)
    arrival_s: float = 0.0  # wall clock when the server got the request (set by preprocess; the TTFT metric)

    def validate(self) -> SamplingParams:
        if self.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be > 0, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequest(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidRequest(f"seed must be in [0, {MAX_SEED}], got {self.seed}")
        if len(self.stop) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in self.stop):
            raise InvalidRequest(f"stop: at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    def with_overrides(self, **overrides) -> SamplingParams:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> SamplingParams:
        fields = json.loads(text)
        return cls(**{**fields, "stop": tuple(fields.get("stop", ()))})


@dataclass(frozen=True)
class VideoSampling:
    """A request's `mm_processor_kwargs` (vLLM's name): how its videos are sampled; None: the processor's."""

    fps: float | None = None
    max_frames: int | None = None

    @classmethod
    def parse(cls, value) -> VideoSampling:
        if value is None:
            return cls()
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise InvalidRequest(f"'mm_processor_kwargs' is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise InvalidRequest("'mm_processor_kwargs' must be an object such as {\"fps\": 2, \"max_frames\": 64}")
        unknown = sorted(set(value) - {"fps", "max_frames"})
        if unknown:
            raise InvalidRequest(f"'mm_processor_kwargs' takes fps and max_frames, not {', '.join(unknown)}")
        fps, most = value.get("fps"), value.get("max_frames")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float))
                                or not math.isfinite(fps) or fps <= 0):
            raise InvalidRequest(f"mm_processor_kwargs fps must be a number > 0, got {fps!r}")
        if most is not None and (isinstance(most, bool) or not isinstance(most, int) or most < 1):
            raise InvalidRequest(f"mm_processor_kwargs max_frames must be an integer >= 1, got {most!r}")
        return cls(None if fps is None else float(fps), most)


@dataclass
class GenerateRequest:
    """What a client sends to `vlm`: a plain prompt or chat messages, plus images and videos."""

    text_input: str | None = None
    messages: str | None = None  # OpenAI chat JSON
    images: list[bytes] = field(default_factory=list)  # encoded bytes, data: URLs or http(s) URLs
    sampling: SamplingParams = field(default_factory=SamplingParams)
    chat_template: bool = True  # False: text_input is the whole prompt, as it is (/v1/completions)
    videos: list[bytes] = field(default_factory=list)  # as images
    video_sampling: VideoSampling = field(default_factory=VideoSampling)

    def validate(self) -> GenerateRequest:
        if (self.text_input is None) == (self.messages is None):
            raise InvalidRequest("send exactly one of 'text_input' or 'messages'")
        if not self.chat_template and self.messages is not None:
            raise InvalidRequest("'chat_template' false needs 'text_input', not 'messages'")
        for kind, files in (("image", self.images), ("video", self.videos)):
            for i, data in enumerate(files):
                if len(data) == 0:
                    raise InvalidRequest(f"{kind} {i} is empty")
        self.sampling.validate()
        return self


def _scalar(arrays: dict, name: str, kind: type):
    value = arrays.get(name)
    if value is None:
        return None
    flat = value.reshape(-1)
    if flat.size != 1:
        raise InvalidRequest(f"'{name}' must hold exactly one value, got {flat.size}")
    return kind(flat[0])


def _text(arrays: dict, name: str) -> str | None:
    value = arrays.get(name)
    if value is None:
        return None
    flat = value.reshape(-1)
    if flat.size != 1:
        raise InvalidRequest(f"'{name}' must hold exactly one string, got {flat.size}")
    raw = flat[0]
    try:
        return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        raise InvalidRequest(f"'{name}' is not valid UTF-8") from None


def _texts(arrays: dict, name: str) -> tuple[str, ...] | None:
    if name not in arrays:
        return None
    try:
        return tuple(bytes(x).decode("utf-8") for x in arrays[name].reshape(-1))
    except UnicodeDecodeError:
        raise InvalidRequest(f"'{name}' is not valid UTF-8") from None


def request_from_arrays(arrays: dict, defaults: SamplingParams) -> GenerateRequest:
    """The public `vlm` tensors (as numpy arrays; absent ones missing) -> a validated GenerateRequest."""
    images, videos = ([bytes(x) if not isinstance(x, bytes) else x for x in arrays.get(name, np.empty(0)).reshape(-1)]
                      for name in ("images", "videos"))
    sampling = defaults.with_overrides(
        max_tokens=_scalar(arrays, "max_tokens", int),
        temperature=_scalar(arrays, "temperature", float),
        top_p=_scalar(arrays, "top_p", float),
        top_k=_scalar(arrays, "top_k", int),
        seed=_scalar(arrays, "seed", int),
        stream=_scalar(arrays, "stream", bool),
        stop=_texts(arrays, "stop"),
        min_tokens=_scalar(arrays, "min_tokens", int),
        ignore_eos=_scalar(arrays, "ignore_eos", bool),
    )
    chat_template = _scalar(arrays, "chat_template", bool)
    return GenerateRequest(_text(arrays, "text_input"), _text(arrays, "messages"), images, sampling,
                           True if chat_template is None else chat_template, videos,
                           VideoSampling.parse(_text(arrays, "mm_processor_kwargs"))).validate()
