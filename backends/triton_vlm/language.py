"""Language engine: prompt ids + image embeddings in, streamed tokens and text out.

One engine thread owns the model. `submit` queues a request and returns at
once; the thread prefills it (image embeddings spliced over the image
placeholder tokens, M-RoPE positions from `image_grid_thw`), then decodes one
token per step with a KV cache and hands each step to the request's callback.
Requests run one after another; the KV cache of a request is dropped when it ends.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoTokenizer, DynamicCache, GenerationConfig

from .config import LanguageConfig, torch_dtype
from .detokenizer import IncrementalDetokenizer
from .errors import InvalidRequest, RequestError
from .models import load_family
from .protocol import SamplingParams
from .sampling import make_generator, sample

log = logging.getLogger(__name__)


@dataclass
class LanguageRequest:
    request_id: str
    input_ids: np.ndarray  # [S] int64
    image_embeds: torch.Tensor  # [sum tokens_per_image, H]
    image_grid_thw: np.ndarray  # [N, 3]
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class StepOutput:
    """What one engine step produced for one request: deltas, and the finish when it ended."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: RequestError | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


Callback = Callable[[StepOutput], None]


class LanguageEngine:
    def __init__(self, config: LanguageConfig) -> None:
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.config = config
        self.family = load_family(config.model_path)
        self.device = torch.device(config.device)
        self.model = self.family.load_text(config.device, torch_dtype(config.dtype, config.device))
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_path)
        self.max_model_len = config.max_model_len or self.family.max_model_len
        self.eos_ids = self._eos_ids(config.model_path)
        self._queue: queue.Queue[tuple[LanguageRequest, Callback] | None] = queue.Queue()
        self._aborted: set[str] = set()
        self._lock = threading.Lock()
        self.kv_tokens_in_use = 0  # tokens held in KV caches right now (an engine stat)
        self._thread = threading.Thread(target=self._loop, name="language-engine", daemon=True)
        self._thread.start()

    def _eos_ids(self, model_path) -> set[int]:
        try:
            eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        except OSError:
            eos = None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        return set(eos if isinstance(eos, list) else [eos])

    # --- public API ---------------------------------------------------------
    def submit(self, request: LanguageRequest, callback: Callback) -> None:
        self._queue.put((request, callback))

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    def generate(self, request: LanguageRequest) -> Iterator[StepOutput]:
        """Blocking iterator over a request's outputs (tests and in-process callers)."""
        outputs: queue.Queue[StepOutput] = queue.Queue()
        self.submit(request, outputs.put)
        while True:
            out = outputs.get()
            yield out
            if out.finished:
                return

    def shutdown(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    # --- engine thread ------------------------------------------------------
    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            request, callback = item
            try:
                self._run(request, callback)
            except RequestError as e:
                callback(StepOutput([], "", "error", e))
            except Exception as e:  # a bug must end this request, not the engine
                log.exception("request %s failed", request.request_id)
                callback(StepOutput([], "", "error", RequestError(f"internal error: {e}")))
            finally:
                with self._lock:
                    self._aborted.discard(request.request_id)

    def _is_aborted(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._aborted

    def _prefill_inputs(self, req: LanguageRequest) -> tuple[torch.Tensor, torch.Tensor, int]:
        ids = torch.as_tensor(req.input_ids, dtype=torch.long, device=self.device)[None]  # [1, S]
        embeds = self.model.model.embed_tokens(ids)  # [1, S, H]
        mask = ids == self.family.image_token_id
        image_embeds = req.image_embeds.to(device=self.device, dtype=embeds.dtype)
        if int(mask.sum()) != image_embeds.shape[0]:
            raise InvalidRequest(
                f"the prompt has {int(mask.sum())} image tokens but {image_embeds.shape[0]} image embeddings came"
            )
        embeds = embeds.masked_scatter(mask[..., None], image_embeds)
        positions, delta = self.family.positions(req.input_ids, req.image_grid_thw)
        return embeds, torch.as_tensor(positions, device=self.device)[:, None, :], delta  # pos: [3, 1, S]

    @torch.inference_mode()
    def _run(self, req: LanguageRequest, callback: Callback) -> None:
        params = req.sampling
        prompt_len = len(req.input_ids)
        if prompt_len >= self.max_model_len:
            raise InvalidRequest(f"the prompt is {prompt_len} tokens; the model context is {self.max_model_len}")
        embeds, positions, delta = self._prefill_inputs(req)
        cache = DynamicCache()
        generator = make_generator(params)
        detok = IncrementalDetokenizer(self.tokenizer)
        try:
            hidden = self.model.model(inputs_embeds=embeds, position_ids=positions, past_key_values=cache,
                                      use_cache=True).last_hidden_state
            self.kv_tokens_in_use += prompt_len
            generated: list[int] = []
            while True:
                logits = self.model.lm_head(hidden[0, -1])  # [V]
                token = sample(logits, params, generator)
                generated.append(token)
                self.kv_tokens_in_use += 1
                finish = self._finish_reason(req, token, len(generated), prompt_len)
                text = detok.add(token) if finish is None else detok.add(token) + detok.flush()
                callback(StepOutput([token], text, finish))
                if finish is not None:
                    return
                step = torch.tensor([[token]], device=self.device)
                pos = torch.full((3, 1, 1), prompt_len + len(generated) - 1 + delta, device=self.device)
                hidden = self.model.model(inputs_embeds=self.model.model.embed_tokens(step), position_ids=pos,
                                          past_key_values=cache, use_cache=True).last_hidden_state
        finally:
            self.kv_tokens_in_use = 0  # one request at a time: its cache is all there is
            del cache

    def _finish_reason(self, req: LanguageRequest, token: int, n_generated: int, prompt_len: int) -> str | None:
        if token in self.eos_ids:
            return "stop"
        if self._is_aborted(req.request_id):
            return "cancelled"
        if n_generated >= req.sampling.max_tokens or prompt_len + n_generated >= self.max_model_len:
            return "length"
        return None
