"""Preprocessing engine: chat + images and videos in, token ids with expanded placeholders and pixels out.

Each image's token count comes from its file header alone, and each video's from its header and its
sampling plan, so the prompt length is checked before any pixel is decoded (eight 8192x8192 PNGs are
refused in milliseconds, not after a minute of decoding). With `image_processing: remote` (E/PD language
servers) nothing is decoded here at all: the files (videos with their plans) go on to the encoder
servers, which decode, resize and patchify them."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from transformers import AutoTokenizer, GenerationConfig

from ..config import PreprocessConfig
from ..errors import InvalidRequest
from ..models import load_family
from ..protocol import GenerateRequest, SamplingParams, VideoSampling
from .chat import Media, build_conversation
from .image_inputs import ImageProcessing
from .image_keys import image_key, model_fingerprint
from .images import ImageLimits, is_url, open_image, read_source
from .video_inputs import VideoProcessing, video_key, wrap


@dataclass
class Preprocessed:
    input_ids: np.ndarray  # [S] int64, one image token per merged patch
    pixel_values: np.ndarray  # [P, C*T*patch*patch] float32, all images' patches in order
    image_grid_thw: np.ndarray  # [N, 3] int64, in patches
    sampling: SamplingParams
    image_files: tuple[bytes, ...] = ()  # image_processing remote: the files, for the encoder servers
    image_keys: tuple[bytes, ...] = ()  # each image's content key (`embedding_cache.py`)


def default_sampling(model_path) -> SamplingParams:
    """The model's generation_config.json gives the defaults (as vLLM does); requests override."""
    try:
        gen = GenerationConfig.from_pretrained(model_path)
    except OSError:
        return SamplingParams()
    if not gen.do_sample:
        return SamplingParams(temperature=0.0)
    return SamplingParams(temperature=gen.temperature or 1.0, top_p=gen.top_p or 1.0, top_k=gen.top_k or 0)


class Preprocessor:
    def __init__(self, config: PreprocessConfig) -> None:
        self.config, self.limits = config, ImageLimits.of(config)
        self.family = load_family(config.model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_path)
        self.images = ImageProcessing(config.model_path, self.family)
        self.videos = VideoProcessing(self.family, config)
        self.max_model_len = config.max_model_len or self.family.max_model_len
        self.default_sampling = default_sampling(config.model_path)
        self.fingerprint = model_fingerprint(config.model_path)
        kinds = {self.family.image_placeholder: "image", self.family.video_placeholder: "video"}
        self._placeholders = {k: v for k, v in kinds.items() if k}
        self._split = re.compile("|".join(map(re.escape, sorted(self._placeholders, key=len, reverse=True))))

    def __call__(self, request: GenerateRequest) -> Preprocessed:
        conversation, media = self.parse(request)
        return self.prepare(conversation, self.read_sources(media), request.sampling, request.video_sampling)

    def parse(self, request: GenerateRequest) -> tuple[list[dict], list[Media]]:
        """The conversation for the chat template, and each image's and video's source (bytes, data: URL
        or URL), in prompt order."""
        request.validate()
        conversation, media = build_conversation(request)
        self.config.check_image_count(sum(m.kind == "image" for m in media), sum(m.kind == "video" for m in media))
        return conversation, media

    def read_sources(self, media: list[Media]) -> list[Media]:
        """Each source's file (URLs fetched under the fetch policy)."""
        numbers = {"image": 0, "video": 0}
        files = []
        for kind, source in media:
            policy = self.limits if kind == "image" else self.videos.limits
            files.append(Media(kind, read_source(source, numbers[kind], policy, kind)))
            numbers[kind] += 1
        return files

    def prepare(self, conversation: list[dict] | str, media: list[Media], sampling: SamplingParams,
                video_sampling: VideoSampling | None = None) -> Preprocessed:
        """Every check that needs no pixels comes first: each image's grid from its header alone (the
        processor's own resize rule), each video's frames and size from its header and the sampling rules,
        so an over-long request is refused before any decoding. Videos are decoded on this thread."""
        images = [m.source for m in media if m.kind == "image"]
        videos = [m.source for m in media if m.kind == "video"]
        image_grid = self.images.grid([open_image(data, i, self.limits).size for i, data in enumerate(images)])
        plans = [self.videos.plan(data, i, video_sampling or VideoSampling()) for i, data in enumerate(videos)]
        video_grid = np.asarray([plan.layout for plan in plans], np.int64).reshape(-1, 3)
        if plans:
            self.videos.check_tokens(int(self.family.tokens_per_image(video_grid).sum()))
            sampling = dataclasses.replace(sampling, video_fps=plans[0].fps)
        input_ids, order = self._prompt_ids(conversation, image_grid, plans)
        grid_thw = np.concatenate([image_grid, video_grid])[order]
        keys = [image_key(self.fingerprint, data) for data in images]
        keys += [video_key(self.fingerprint, data, plan) for data, plan in zip(videos, plans, strict=True)]
        keys = tuple(keys[i] for i in order)
        if self.config.image_processing == "remote":  # the encoder servers decode them, videos by their plans
            files = images + [wrap(data, plan) for data, plan in zip(videos, plans, strict=True)]
            return Preprocessed(input_ids, np.zeros((0, self.images.patch_dim), np.float32), grid_thw, sampling,
                                tuple(files[i] for i in order), keys)
        image_pixels, decoded_grid = self.images.decode(images, self.limits)
        if not np.array_equal(decoded_grid, image_grid):  # the resize rule and the processor disagree: a bug
            raise RuntimeError(f"image grids from headers {image_grid.tolist()} != decoded {decoded_grid.tolist()}")
        pixels = list(np.split(image_pixels, np.cumsum(self.family.pixel_rows(image_grid))[:-1])) if images else []
        pixels += [self.videos.pixels(data, i, plan)[0] for i, (data, plan) in enumerate(zip(videos, plans,
                                                                                              strict=True))]
        pixel_values = np.concatenate([pixels[i] for i in order]) if order else image_pixels
        return Preprocessed(input_ids, pixel_values, grid_thw, sampling, image_keys=keys)

    def _prompt_ids(self, conversation: list[dict] | str, image_grid: np.ndarray,
                    plans: list) -> tuple[np.ndarray, list[int]]:
        """The chat template applied (a str is the prompt already), each image and video placeholder expanded
        to its tokens (the i-th of a kind takes the i-th image or video); checked against the context length.
        -> (ids, the media in prompt order: indices into the images then the videos)."""
        raw = isinstance(conversation, str)
        prompt = conversation if raw else self.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True)
        try:  # JSON's "\ud800" escapes make lone surrogates: not text, and the tokenizer would fail on them
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequest(f"the text holds {prompt[e.start]!r} at character {e.start}, a lone UTF-16 "
                                 "surrogate: not Unicode text") from None
        pieces = self._split.split(prompt)
        kinds = [self._placeholders[m] for m in self._split.findall(prompt)]
        if kinds.count("image") != len(image_grid) or kinds.count("video") != len(plans):
            raise InvalidRequest("the image and video placeholders in the prompt do not match the media sent")
        image_tokens = self.family.tokens_per_image(image_grid)
        video_tokens = [int(self.family.tokens_per_image(np.asarray([p.layout]))[0]) for p in plans]
        order, text, seen = [], [pieces[0]], {"image": 0, "video": 0}
        for kind, piece in zip(kinds, pieces[1:], strict=True):
            i = seen[kind]
            seen[kind] += 1
            if kind == "image":
                order.append(i)
                text.append(self.family.expand_placeholder(int(image_tokens[i])))
            else:
                order.append(len(image_grid) + i)
                text.append(self.videos.rules.expand(plans[i], video_tokens[i]))
            text.append(piece)
        input_ids = np.asarray(self.tokenizer("".join(text), add_special_tokens=raw).input_ids, np.int64)
        if len(input_ids) >= self.max_model_len:
            media = int(image_tokens.sum()) + sum(video_tokens)
            raise InvalidRequest(
                f"the prompt is {len(input_ids)} tokens ({media} of them for images and videos); "
                f"the model context is {self.max_model_len} tokens"
            )
        return input_ids, order


class PreprocessStage:
    """Answers each request through `done(output, error)`, exactly once. A request with URLs or videos
    waits for its fetches and decoding on an I/O thread, so a slow web server or a long video holds one of
    those threads, never the Triton instance: other requests are preprocessed at once on the caller's thread."""

    def __init__(self, preprocessor: Preprocessor, max_fetching: int = 64) -> None:
        self.preprocessor = preprocessor
        self._fetching = ThreadPoolExecutor(max_fetching, thread_name_prefix="preprocess-fetch")

    def submit(self, request: GenerateRequest, done: Done) -> None:
        try:
            conversation, media = self.preprocessor.parse(request)
        except Exception as e:
            done(None, e)
            return
        work = functools.partial(_answer, done, lambda: self.preprocessor.prepare(
            conversation, self.preprocessor.read_sources(media), request.sampling, request.video_sampling))
        if any(m.kind == "video" or is_url(m.source) for m in media):  # fetches and video decoding wait here
            self._fetching.submit(work)
        else:
            work()

    def shutdown(self) -> None:
        self._fetching.shutdown(wait=True, cancel_futures=False)


Done = Callable[[Preprocessed | None, Exception | None], None]


def _answer(done: Done, work: Callable[[], Preprocessed]) -> None:
    try:
        out = work()
    except Exception as e:
        done(None, e)
    else:
        done(out, None)
