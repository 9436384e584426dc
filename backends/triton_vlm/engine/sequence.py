"""A sequence: one request inside the language engine, and its rules.

It holds the request's token ids once (the prompt, then what it generated), how many of them have their
keys and values in its KV blocks (`num_computed`), its block table, and what the model inputs need: the
rotary positions (the prompt's from its images' layouts, then index + delta) and the image rows that
replace the placeholder tokens. Its rules decide when it ends (EOS, stop strings, min_tokens, max_tokens,
the context) and turn tokens into text.

Prefix-cache keys (`block_key`): a full block's key is (parent key, its token ids, extra keys). Every
image of one size has the same placeholder ids, so a block overlapping an image's placeholders adds, for
each such image, (its content key, the block's offset into it, its layout row) - vLLM's
("mm", identifier, offset) rule. The layout is what the rotary positions are built from (M-RoPE), and
each block's parent chain covers every earlier token and image, so equal keys mean equal positions and
equal inputs, hence equal keys and values (a family's extra features, Qwen3-VL's deepstack, are part of
those). An image without a content key makes its blocks, and all after them, uncacheable.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch

from ..errors import InvalidRequest, RequestError
from ..protocol import SamplingParams
from .detokenizer import IncrementalDetokenizer
from .kv_handoff import PrefilledKV
from .sampling import make_generator
from .stop_strings import StopStrings


@dataclass
class LanguageRequest:
    request_id: str
    input_ids: np.ndarray  # [S] int64
    image_embeds: torch.Tensor  # [sum tokens_per_image, embedding_width]
    image_grid_thw: np.ndarray  # [N, 3] the images' layouts
    sampling: SamplingParams = field(default_factory=SamplingParams)
    image_keys: tuple[bytes, ...] = ()  # each image's content key (the embedding cache's); () if unknown
    # prefill/decode disaggregation (`kv_handoff.py`): end at the first token with the prompt's KV (prefill
    # side), or start from a hand-off: the prompt's KV and the first token (decode side)
    prefill_only: bool = False
    prefilled: PrefilledKV | None = None
    kv_from: int = 0  # prefill side: hand over the KV of the prompt's tokens from this one on


@dataclass
class StepOutput:
    """What one engine step produced for one request: deltas, and the finish when it ended."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # stop | length | cancelled | error | prefilled (with its handoff)
    error: RequestError | None = None
    handoff: PrefilledKV | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


Callback = Callable[[StepOutput], None]


def deliver(callback: Callback, out: StepOutput) -> None:
    """Hand an output to its request's callback; a failing callback (its client gone) hurts no other request."""
    try:
        callback(out)
    except Exception:
        logging.getLogger(__name__).exception("a request's callback failed")


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


def eos_token_ids(model_path, tokenizer) -> set[int]:
    """The tokens that end a sequence: the generation config's EOS ids, else the tokenizer's."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        eos = None
    eos = eos if eos is not None else tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def block_hash(parent: bytes, token_ids: list[int], extras: tuple) -> bytes:
    data = parent + np.asarray(token_ids, np.int64).tobytes() + repr(extras).encode()
    return hashlib.blake2b(data, digest_size=16).digest()


class Sequence:
    def __init__(self, request: LanguageRequest, callback: Callback, family, tokenizer, block_size: int,
                 max_model_len: int) -> None:
        """Raises InvalidRequest for image rows that do not fit the prompt's placeholders."""
        ids = np.asarray(request.input_ids, np.int64).reshape(-1)
        rows = request.image_embeds
        self.image_at = np.flatnonzero(np.isin(ids, family.media_token_ids))  # each image (video) row's index
        if len(self.image_at) != rows.shape[0] or rows.shape[1] != family.embedding_width:
            raise InvalidRequest(f"the prompt has {len(self.image_at)} image tokens of width "
                                 f"{family.embedding_width}, but image embeddings {list(rows.shape)} came")
        # the request itself is not kept: its ids live on as token_ids, once
        self.request_id, self.sampling, self.callback = request.request_id, request.sampling, callback
        self.block_size, self.max_model_len, self.image_rows = block_size, max_model_len, rows
        self.positions, self.delta = family.positions(ids, request.image_grid_thw,  # [3, S], int
                                                      request.sampling.video_fps)
        self.images = _image_spans(family, self.image_at, request.image_grid_thw, request.image_keys)
        self.token_ids: list[int] = ids.tolist()
        self.num_prompt_tokens = len(ids)
        self.num_computed = 0  # tokens whose keys and values are in the blocks
        self.num_keyed = 0  # leading blocks the block manager has keyed for the prefix cache
        self.block_table: list[int] = []
        self.status = Status.WAITING
        self.cancelled = False
        self.generator = make_generator(request.sampling)
        self.prefill_only, self.prefilled = request.prefill_only, request.prefilled  # (kept until admitted)
        self.kv_from = request.kv_from
        if not 0 <= self.kv_from < self.num_prompt_tokens:
            raise InvalidRequest(f"kv_from {self.kv_from} is outside the prompt's {self.num_prompt_tokens} tokens")
        if self.prefilled is not None:
            if self.prefilled.num_tokens != self.num_prompt_tokens or self.prefilled.delta != self.delta:
                raise InvalidRequest(f"the handed-off KV is of {self.prefilled.num_tokens} tokens with position "
                                     f"delta {self.prefilled.delta}; this prompt has {self.num_prompt_tokens} "
                                     f"tokens and delta {self.delta}")
            if self.generator is not None and self.prefilled.generator_state is not None:
                self.generator.set_state(self.prefilled.generator_state)
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = StopStrings(request.sampling.stop)
        self._keys: list[bytes | None] = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def cancel(self) -> None:
        """End this request ("cancelled") at the engine's next step; any thread may call it."""
        self.cancelled = True

    # --- model inputs ---------------------------------------------------------
    def positions_of(self, start: int, end: int) -> np.ndarray:
        """Rotary positions [3, end - start] of tokens start..end-1."""
        prompt = self.positions[:, start:min(end, self.num_prompt_tokens)]
        generated = np.arange(max(start, self.num_prompt_tokens), end) + self.delta
        return np.concatenate([prompt, np.broadcast_to(generated, (3, len(generated)))], axis=1)

    def image_rows_in(self, start: int, end: int) -> tuple[np.ndarray, torch.Tensor]:
        """(indices into start..end-1 of its image tokens, their image rows)."""
        first, last = np.searchsorted(self.image_at, [start, end])
        return self.image_at[first:last] - start, self.image_rows[first:last]

    # --- prefix cache ---------------------------------------------------------
    def block_key(self, i: int) -> bytes | None:
        """The prefix-cache key of full block i (tokens i*bs .. (i+1)*bs - 1), None if uncacheable."""
        bs = self.block_size
        while len(self._keys) <= i:
            j = len(self._keys)
            parent = self._keys[-1] if j else b""
            extras = None if parent is None else _extra_keys(self.images, j * bs, (j + 1) * bs)
            self._keys.append(None if extras is None else block_hash(parent, self.token_ids[j * bs:(j + 1) * bs],
                                                                      extras))
        return self._keys[i]

    # --- rules ----------------------------------------------------------------
    def append(self, token: int, eos_ids: set[int]) -> StepOutput:
        """Take a sampled token -> its output (text delta; the finish when this token ends the sequence)."""
        self.token_ids.append(token)
        finish = self._finish_reason(token, eos_ids)
        text = self.detok.add(token) + (self.detok.flush() if finish else "")
        check = self.num_generated > self.sampling.min_tokens  # the first min_tokens never stop
        text, hit_stop = self.stops.feed(text, final=finish is not None, check=check)
        return StepOutput([token], text, "stop" if hit_stop else finish)

    def _finish_reason(self, token: int, eos_ids: set[int]) -> str | None:
        if token in eos_ids and not self.sampling.ignore_eos:
            return "stop"
        if self.cancelled:
            return "cancelled"
        if self.num_generated >= self.sampling.max_tokens or self.num_tokens >= self.max_model_len:
            return "length"
        return None


def _image_spans(family, image_at: np.ndarray, layout: np.ndarray, keys: tuple[bytes, ...]) -> list[tuple]:
    """(first token, last token + 1, content key or None, layout row) of each image in the prompt."""
    layout = np.asarray(layout, np.int64).reshape(-1, 3)
    counts = family.tokens_per_image(layout) if len(layout) else np.zeros(0, np.int64)
    if len(keys) != len(layout) or int(counts.sum()) != len(image_at):
        keys = (None,) * len(layout)  # the images cannot be told apart: their blocks are not cached
    if int(counts.sum()) != len(image_at):  # then every block from the first image token on is uncacheable
        return [(int(image_at[0]), 2**62, None, ())] if len(image_at) else []
    ends = np.cumsum(counts)
    return [(int(image_at[end - n]), int(image_at[end - 1]) + 1, key, tuple(int(v) for v in row))
            for n, end, key, row in zip(counts, ends, keys, layout, strict=True) if n]


def _extra_keys(images: list[tuple], start: int, end: int) -> tuple | None:
    """The extra keys of the block of tokens start..end-1; None if an image in it has no content key."""
    extras = []
    for first, last, key, layout in images:
        if first < end and last > start:
            if key is None:
                return None
            extras.append((key, start - first, layout))
    return tuple(extras)
