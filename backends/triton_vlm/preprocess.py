"""Preprocessing engine: chat + images in, token ids with expanded image placeholders and pixels out.

With `image_processing: remote` (E/PD language servers) the images are not decoded here: each file's
header gives its size, the size gives its grid and placeholder count, and the files themselves go on
to the encoder servers, which decode, resize and patchify them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from transformers import AutoTokenizer, GenerationConfig

from .chat import build_conversation
from .config import PreprocessConfig
from .errors import InvalidRequest
from .image_inputs import ImageProcessing
from .images import load_image, open_image, read_source
from .models import load_family
from .protocol import GenerateRequest, SamplingParams


@dataclass
class Preprocessed:
    input_ids: np.ndarray  # [S] int64, one image token per merged patch
    pixel_values: np.ndarray  # [P, C*T*patch*patch] float32, all images' patches in order
    image_grid_thw: np.ndarray  # [N, 3] int64, in patches
    sampling: SamplingParams
    image_files: tuple[bytes, ...] = ()  # image_processing remote: the files, for the encoder servers


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
        self.config = config
        self.family = load_family(config.model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_path)
        self.images = ImageProcessing(config.model_path)
        self.image_pad = self.tokenizer.convert_ids_to_tokens(self.family.image_token_id)
        self.max_model_len = config.max_model_len or self.family.max_model_len
        self.default_sampling = default_sampling(config.model_path)

    def __call__(self, request: GenerateRequest) -> Preprocessed:
        request.validate()
        conversation, sources = build_conversation(request)
        self.config.check_image_count(len(sources))
        limits = self.config.image_limits
        files: tuple[bytes, ...] = ()
        if self.config.image_processing == "remote":
            files = tuple(read_source(source, i, limits) for i, source in enumerate(sources))
            grid_thw = self.images.grid([open_image(data, i, limits).size for i, data in enumerate(files)])
            pixel_values = np.zeros((0, self.images.patch_dim), np.float32)
        else:
            pixel_values, grid_thw = self.images.pixels([load_image(s, i, limits) for i, s in enumerate(sources)])
        prompt = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        pieces = prompt.split(self.image_pad)
        if len(pieces) - 1 != len(sources):
            raise InvalidRequest("the image placeholders in the prompt do not match the images sent")
        counts = self.family.tokens_per_image(grid_thw)
        prompt = pieces[0] + "".join(self.image_pad * int(n) + p for n, p in zip(counts, pieces[1:], strict=True))
        input_ids = np.asarray(self.tokenizer(prompt, add_special_tokens=False).input_ids, np.int64)
        if len(input_ids) >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt is {len(input_ids)} tokens ({int(counts.sum())} of them for images); "
                f"the model context is {self.max_model_len} tokens"
            )
        return Preprocessed(input_ids, pixel_values, grid_thw, request.sampling, files)
