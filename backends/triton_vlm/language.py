"""Language engine: prompt ids + image embeddings in, streamed tokens and text out, with iteration-level
(continuous) batching over a tensor-parallel decoder.

One engine thread owns the model (rank 0; ranks 1..N-1 are worker processes that mirror each step).
`submit` queues a request and returns at once. Every iteration the thread
1. takes new requests and, while a KV cache slot is free and `max_prefill_tokens` allows, prefills
   them together in one forward (image embeddings spliced over the image placeholder tokens, M-RoPE
   positions from `image_grid_thw`) and emits each one's first token; requests that find no free
   slot wait in the queue (admission control: queue, never fail);
2. runs one decode step for every running sequence together, each attending to its own slot;
3. emits each sequence's token; finished or cancelled sequences leave and free their slot.

KV cache: fixed slots (`max_num_seqs`), each as long as the context (capped by `kv_cache_mb`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoTokenizer, GenerationConfig

from .config import LanguageConfig, torch_dtype, usable_cores
from .detokenizer import IncrementalDetokenizer
from .errors import InvalidRequest, RequestError, Unavailable
from .models import load_family
from .protocol import SamplingParams
from .runner import ModelRunner
from .sampling import make_generator, sample
from .stop_strings import StopStrings

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


@dataclass
class _Sequence:
    request: LanguageRequest
    callback: Callback
    slot: int
    prompt_len: int
    delta: int  # M-RoPE: text position = token index + delta after the images
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    stops: StopStrings
    generated: list[int] = field(default_factory=list)
    done: bool = False

    @property
    def cached(self) -> int:
        """Tokens whose keys and values are in the slot (the last sampled token is not, yet)."""
        return self.prompt_len + len(self.generated) - 1


class LanguageEngine:
    def __init__(self, config: LanguageConfig) -> None:
        self.config = config
        self.family = load_family(config.model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_path)
        self.eos_ids = self._eos_ids(config.model_path)
        tp_size = config.tensor_parallel
        threads = config.threads or max(1, usable_cores() // tp_size)
        dtype = torch_dtype(config.dtype, config.device)
        self.slots = config.max_num_seqs
        self.max_model_len = min(config.max_model_len or self.family.max_model_len,
                                 self._slot_len_for_budget(tp_size, dtype))
        self._workers = []
        init_method = ""
        if tp_size > 1:
            from . import tp_worker
            from .server import free_port

            init_method = f"tcp://127.0.0.1:{free_port()}"
            self._workers = tp_worker.start_workers(tp_size, init_method, config.model_path, config.device,
                                                    config.dtype, self.slots, self.max_model_len, threads)
        self._queue: queue.Queue[tuple[LanguageRequest, Callback] | None] = queue.Queue()
        self._aborted: set[str] = set()
        self._lock = threading.Lock()
        self._kv: dict[int, int] = {}  # slot -> tokens it holds, for the running sequences
        self.peak_batch = 0  # the most sequences decoded in one step so far (an engine stat)
        # The engine thread builds the model itself: torch ops run several times slower in a thread other
        # than the one whose OpenMP team first touched the weights (measured: 4.9 vs 1.7 ms a step).
        built: queue.Queue[BaseException | None] = queue.Queue()  # None: built
        self._thread = threading.Thread(target=self._run, name="language-engine", daemon=True,
                                        args=(built, dtype, init_method, threads))
        self._thread.start()
        failure = built.get()
        if failure is not None:
            for worker in self._workers:
                worker.kill()
            raise failure

    def _run(self, built: queue.Queue, dtype: torch.dtype, init_method: str, threads: int) -> None:
        from .tp import init

        torch.set_num_threads(threads)  # on the thread that runs the model
        try:
            tp = init(0, self.config.tensor_parallel, init_method, self.config.device)
            runner = ModelRunner(self.family, self.config.device, dtype, tp, self.slots, self.max_model_len)
        except BaseException as e:
            built.put(e)
            return
        self.runner = runner
        built.put(None)
        self._loop()

    @property
    def kv_tokens_in_use(self) -> int:
        """Tokens held in KV cache slots right now (an engine stat; 0 when idle)."""
        with self._lock:
            return sum(self._kv.values())

    @property
    def running(self) -> int:
        """Sequences in the running batch."""
        with self._lock:
            return len(self._kv)

    def _slot_len_for_budget(self, tp_size: int, dtype: torch.dtype) -> int:
        text = self.family.config.text_config
        head_dim = text.hidden_size // text.num_attention_heads
        per_token = 2 * text.num_hidden_layers * (text.num_key_value_heads // tp_size) * head_dim
        per_token *= torch.finfo(dtype).bits // 8
        return max(1, self.config.kv_cache_mb * 2**20 // (per_token * self.slots))

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
        self._thread.join(timeout=60)
        from .tp_worker import stop_workers

        stop_workers(self._workers)
        self.runner.tp.close()

    # --- engine thread ------------------------------------------------------
    def _loop(self) -> None:
        waiting: deque[tuple[LanguageRequest, Callback]] = deque()
        running: list[_Sequence] = []
        free = list(range(self.slots))
        while self._take_new(waiting, block=not (running or waiting)):
            try:
                self._admit(waiting, running, free)
                self._decode(running)
            except Exception as e:  # a bug must end the running requests, not the engine
                log.exception("engine step failed")
                for seq in running:
                    if not seq.done:
                        seq.done = True
                        with self._lock:
                            self._kv.pop(seq.slot, None)
                        seq.callback(StepOutput([], "", "error", RequestError(f"internal error: {e}")))
            for seq in [s for s in running if s.done]:
                running.remove(seq)
                free.append(seq.slot)
                with self._lock:
                    self._aborted.discard(seq.request.request_id)
        for _, callback in waiting:  # shutting down: every accepted request still gets an answer
            callback(StepOutput([], "", "error", Unavailable("the language model is shutting down")))
        for seq in running:
            seq.callback(StepOutput([], "", "cancelled"))
        self.runner.stop()

    def _take_new(self, waiting: deque, block: bool) -> bool:
        """Move queued requests into `waiting` (waiting for one only if `block`); False on shutdown."""
        try:
            item = self._queue.get(block=block)
            while item is not None:
                waiting.append(item)
                item = self._queue.get_nowait()
            return False
        except queue.Empty:
            return True

    def _is_aborted(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._aborted

    def _admit(self, waiting: deque, running: list[_Sequence], free: list[int]) -> None:
        """Prefill waiting requests together while slots are free and `max_prefill_tokens` allows (the
        first always goes); each emits its first token."""
        batch: list[tuple[LanguageRequest, Callback, tuple]] = []
        tokens = 0
        while waiting and len(batch) < len(free):
            request, callback = waiting[0]
            if batch and tokens + len(request.input_ids) > self.config.max_prefill_tokens:
                break
            waiting.popleft()
            if self._is_aborted(request.request_id):
                with self._lock:
                    self._aborted.discard(request.request_id)
                callback(StepOutput([], "", "cancelled"))
                continue
            try:
                if len(request.input_ids) >= self.max_model_len:
                    raise InvalidRequest(f"the prompt is {len(request.input_ids)} tokens; "
                                         f"the model context is {self.max_model_len}")
                batch.append((request, callback, self.prompt_inputs(request)))
            except RequestError as e:
                callback(StepOutput([], "", "error", e))
                continue
            except Exception as e:  # a bug in one request's inputs fails that request only
                log.exception("inputs of %s failed", request.request_id)
                callback(StepOutput([], "", "error", RequestError(f"internal error: {e}")))
                continue
            tokens += len(request.input_ids)
        if batch:
            self._prefill(batch, running, free)

    def _prefill(self, batch: list[tuple[LanguageRequest, Callback, tuple]], running: list[_Sequence],
                 free: list[int]) -> None:
        slots = free[-len(batch):][::-1]
        try:
            logits = self.runner.prefill(torch.cat([embeds for _, _, (embeds, _, _) in batch], dim=1),
                                         torch.cat([positions for _, _, (_, positions, _) in batch], dim=2),
                                         slots, [len(request.input_ids) for request, _, _ in batch])
        except Exception as e:
            log.exception("prefill of %s failed", ", ".join(request.request_id for request, _, _ in batch))
            for _, callback, _ in batch:
                callback(StepOutput([], "", "error", RequestError(f"internal error: {e}")))
            return
        del free[-len(batch):]
        for (request, callback, (_, _, delta)), slot, row in zip(batch, slots, logits, strict=True):
            seq = _Sequence(request, callback, slot, len(request.input_ids), delta, make_generator(request.sampling),
                            IncrementalDetokenizer(self.tokenizer), StopStrings(request.sampling.stop))
            running.append(seq)
            self._emit(seq, sample(row, request.sampling, seq.generator))

    def prompt_inputs(self, req: LanguageRequest) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Token embeddings with the image embeddings spliced over the image tokens [1, S, H], M-RoPE
        positions [3, 1, S], and the position delta for decoding."""
        ids = torch.as_tensor(req.input_ids, dtype=torch.long)[None]  # [1, S]
        embeds = self.runner.embed(ids)  # [1, S, H]
        mask = (ids == self.family.image_token_id).to(embeds.device)
        image_embeds = req.image_embeds.to(device=embeds.device, dtype=embeds.dtype)
        if int(mask.sum()) != image_embeds.shape[0]:
            raise InvalidRequest(
                f"the prompt has {int(mask.sum())} image tokens but {image_embeds.shape[0]} image embeddings came")
        embeds = embeds.masked_scatter(mask[..., None], image_embeds)
        positions, delta = self.family.positions(req.input_ids, req.image_grid_thw)
        return embeds, torch.as_tensor(positions)[:, None, :], delta

    def _decode(self, running: list[_Sequence]) -> None:
        """One token for every running sequence, in one batched step."""
        active = sorted((seq for seq in running if not seq.done), key=lambda seq: seq.slot)  # slots in a row: a view
        if not active:
            return
        self.peak_batch = max(self.peak_batch, len(active))
        logits = self.runner.decode([seq.generated[-1] for seq in active], [seq.cached + seq.delta for seq in active],
                                    [seq.slot for seq in active], [seq.cached for seq in active])
        greedy = logits.argmax(dim=-1).tolist()  # one call for the whole batch
        for seq, row, best in zip(active, logits, greedy, strict=True):
            params = seq.request.sampling
            self._emit(seq, best if params.greedy else sample(row, params, seq.generator))

    def _emit(self, seq: _Sequence, token: int) -> None:
        seq.generated.append(token)
        finish = self._finish_reason(seq, token)
        text = seq.detok.add(token) + (seq.detok.flush() if finish else "")
        text, hit_stop = seq.stops.feed(text, final=finish is not None)
        finish = "stop" if hit_stop else finish
        seq.done = finish is not None
        with self._lock:  # before the callback: whoever sees the finish sees the slot freed
            if seq.done:
                self._kv.pop(seq.slot, None)
            else:
                self._kv[seq.slot] = seq.cached + 1
        seq.callback(StepOutput([token], text, finish))

    def _finish_reason(self, seq: _Sequence, token: int) -> str | None:
        if token in self.eos_ids:
            return "stop"
        if self._is_aborted(seq.request.request_id):
            return "cancelled"
        n = len(seq.generated)
        if n >= seq.request.sampling.max_tokens or seq.prompt_len + n >= self.max_model_len:
            return "length"
        return None
