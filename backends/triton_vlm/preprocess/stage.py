"""Preprocessing engine: chat + images in, token ids with expanded image placeholders and pixels out.

Each image's token count comes from its file header alone, so the prompt length is checked before any
pixel is decoded (eight 8192x8192 PNGs are refused in milliseconds, not after a minute of decoding).
With `image_processing: remote` (E/PD language servers) the images are not decoded here at all: the
files go on to the encoder servers, which decode, resize and patchify them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from transformers import AutoTokenizer, GenerationConfig

from ..config import PreprocessConfig
from ..errors import InvalidRequest
from ..models import load_family
from ..protocol import GenerateRequest, SamplingParams
from .chat import build_conversation
from .image_inputs import ImageProcessing
from .image_keys import image_key, model_fingerprint
from .images import ImageLimits, is_url, open_image, read_source


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
        self.max_model_len = config.max_model_len or self.family.max_model_len
        self.default_sampling = default_sampling(config.model_path)
        self.fingerprint = model_fingerprint(config.model_path)

    def __call__(self, request: GenerateRequest) -> Preprocessed:
        conversation, sources = self.parse(request)
        return self.prepare(conversation, self.read_sources(sources), request.sampling)

    def parse(self, request: GenerateRequest) -> tuple[list[dict], list[bytes]]:
        """The conversation for the chat template, and each image's source (bytes, data: URL or URL)."""
        request.validate()
        conversation, sources = build_conversation(request)
        self.config.check_image_count(len(sources))
        return conversation, sources

    def read_sources(self, sources: list[bytes]) -> list[bytes]:
        """Each source's encoded image file (URLs fetched under the fetch policy)."""
        return [read_source(source, i, self.limits) for i, source in enumerate(sources)]

    def prepare(self, conversation: list[dict] | str, files: list[bytes], sampling: SamplingParams) -> Preprocessed:
        """Every check that needs no pixels comes first: each image's grid is computed from its header
        alone (the processor's own resize rule), so an over-long request is refused before any decoding."""
        grid_thw = self.images.grid([open_image(data, i, self.limits).size for i, data in enumerate(files)])
        input_ids = self._prompt_ids(conversation, grid_thw)
        keys = tuple(image_key(self.fingerprint, data) for data in files)
        if self.config.image_processing == "remote":  # the encoder servers decode them
            return Preprocessed(input_ids, np.zeros((0, self.images.patch_dim), np.float32), grid_thw, sampling,
                                tuple(files), keys)
        pixel_values, decoded_grid = self.images.decode(files, self.limits)
        if not np.array_equal(decoded_grid, grid_thw):  # the resize rule and the processor disagree: a bug
            raise RuntimeError(f"image grids from headers {grid_thw.tolist()} != decoded {decoded_grid.tolist()}")
        return Preprocessed(input_ids, pixel_values, grid_thw, sampling, image_keys=keys)

    def _prompt_ids(self, conversation: list[dict] | str, grid_thw: np.ndarray) -> np.ndarray:
        """The chat template applied (a str is the prompt already), each image placeholder expanded to its
        token count; checked against the context length."""
        raw = isinstance(conversation, str)
        prompt = conversation if raw else self.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True)
        try:  # JSON's "\ud800" escapes make lone surrogates: not text, and the tokenizer would fail on them
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequest(f"the text holds {prompt[e.start]!r} at character {e.start}, a lone UTF-16 "
                                 "surrogate: not Unicode text") from None
        pieces = prompt.split(self.family.image_placeholder)
        if len(pieces) - 1 != len(grid_thw):
            raise InvalidRequest("the image placeholders in the prompt do not match the images sent")
        counts = self.family.tokens_per_image(grid_thw)
        prompt = pieces[0] + "".join(self.family.expand_placeholder(int(n)) + p
                                     for n, p in zip(counts, pieces[1:], strict=True))
        input_ids = np.asarray(self.tokenizer(prompt, add_special_tokens=raw).input_ids, np.int64)
        if len(input_ids) >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt is {len(input_ids)} tokens ({int(counts.sum())} of them for images); "
                f"the model context is {self.max_model_len} tokens"
            )
        return input_ids


class PreprocessStage:
    """Answers each request through `done(output, error)`, exactly once. A request with image URLs waits
    for its fetches on an I/O thread, so a slow web server holds one of those threads, never the Triton
    instance: requests without URLs are preprocessed at once on the caller's thread."""

    def __init__(self, preprocessor: Preprocessor, max_fetching: int = 64) -> None:
        self.preprocessor = preprocessor
        self._fetching = ThreadPoolExecutor(max_fetching, thread_name_prefix="preprocess-fetch")

    def submit(self, request: GenerateRequest, done: Done) -> None:
        try:
            conversation, sources = self.preprocessor.parse(request)
        except Exception as e:
            done(None, e)
            return
        work = functools.partial(_answer, done, lambda: self.preprocessor.prepare(
            conversation, self.preprocessor.read_sources(sources), request.sampling))
        if any(is_url(source) for source in sources):
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
