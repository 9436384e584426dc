"""Language engine: prompt ids + image embeddings in, streamed tokens and text out, with iteration-level
(continuous) batching over a tensor-parallel decoder.

One engine thread owns the model (rank 0; ranks 1..N-1 are worker processes that mirror each step).
`submit` queues a request and returns at once. Every iteration (`_step`) the thread takes new requests,
then runs two phases, each *schedule -> run -> postprocess* (nano-vllm's step):
1. prefill: while a KV cache slot is free and `max_prefill_tokens` allows, waiting requests get a slot
   and their prompt inputs (image embeddings spliced over the placeholder tokens, the family's
   positions and extras); one forward runs them together; each emits its first token. Requests that
   find no free slot wait in the queue (admission control: queue, never fail);
2. decode: every running sequence runs one token together, each attending to its own slot, and emits
   it; finished or cancelled sequences leave and free their slot.

KV cache: fixed slots (`max_num_seqs`), each as long as the context (capped by `kv_cache_mb`), kept in
one ledger (`slots.py`).
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoTokenizer, GenerationConfig

from ..config import LanguageConfig, torch_dtype, usable_cores
from ..errors import InvalidRequest, RequestError, Unavailable
from ..models import load_family
from ..models.layers import head_dim
from ..protocol import SamplingParams
from .detokenizer import IncrementalDetokenizer
from .runner import ModelRunner, PromptInputs
from .sampling import make_generator, sample
from .slots import SlotLedger
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


@dataclass(frozen=True)
class EngineStats:
    """The engine now (the metrics' source): sequences running and waiting, slots held, and token totals."""

    running: int  # each holds one KV-cache slot: also the slots in use
    waiting: int  # accepted, not yet prefilled (no free slot, or over max_prefill_tokens this step)
    prefill_tokens: int  # prompt tokens prefilled so far
    decode_tokens: int  # tokens decode steps produced so far (each sequence's first comes from its prefill)


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
    prompt: PromptInputs | None = None  # until prefilled

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

            # a file rendezvous: no port to race for (gloo's own connections bind ports the kernel picks)
            init_method = f"file://{tempfile.gettempdir()}/triton-vlm-tp-{os.getpid()}-{uuid.uuid4().hex}"
            self._workers = tp_worker.start_workers(tp_size, init_method, config.model_path, config.device,
                                                    config.dtype, self.slots, self.max_model_len, threads)
        self._queue: queue.Queue[tuple[LanguageRequest, Callback] | None] = queue.Queue()
        self._aborted: set[str] = set()
        self._live: Counter[str] = Counter()  # request id -> its unfinished requests
        self._lock = threading.Lock()
        self._slots = SlotLedger(self.slots)  # which slot each running sequence holds, and its tokens
        self.peak_batch = 0  # the most sequences decoded in one step so far (an engine stat)
        self._waiting = 0  # requests the engine thread holds back (it alone writes these three)
        self._prefill_tokens = self._decode_tokens = 0
        # The engine thread builds the model itself: torch ops run several times slower in a thread other
        # than the one whose OpenMP team first touched the weights (measured: 4.9 vs 1.7 ms a step).
        built: queue.Queue[BaseException | None] = queue.Queue()  # None: built
        self._thread = threading.Thread(target=self._main, name="language-engine", daemon=True,
                                        args=(built, dtype, init_method, threads))
        self._thread.start()
        failure = built.get()
        if failure is not None:
            for worker in self._workers:
                worker.kill()
            raise failure

    def _main(self, built: queue.Queue, dtype: torch.dtype, init_method: str, threads: int) -> None:
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
        return self._slots.tokens

    @property
    def running(self) -> int:
        """Sequences in the running batch (each holds a slot)."""
        return self._slots.held

    @property
    def free_slots(self) -> int:
        """KV cache slots no sequence holds (an engine stat; all of them when idle)."""
        return self._slots.free

    def stats(self) -> EngineStats:
        return EngineStats(self._slots.held, self._waiting + self._queue.qsize(), self._prefill_tokens,
                           self._decode_tokens)

    def _slot_len_for_budget(self, tp_size: int, dtype: torch.dtype) -> int:
        text = self.family.text_config
        per_token = 2 * text.num_hidden_layers * (text.num_key_value_heads // tp_size) * head_dim(text)
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
        request_id = request.request_id
        with self._lock:
            self._live[request_id] += 1

        def tracked(out: StepOutput) -> None:  # every request ends with exactly one finished output
            if out.finished:
                with self._lock:
                    self._live[request_id] -= 1
                    if self._live[request_id] <= 0:
                        del self._live[request_id]
                        self._aborted.discard(request_id)
            callback(out)

        self._queue.put((request, tracked))

    def abort(self, request_id: str) -> bool:
        """End the request(s) with this id ("cancelled") at their next step. -> False if none is unfinished
        (an id that finished, or never came, must not cancel a later request that reuses it)."""
        with self._lock:
            if request_id in self._live:
                self._aborted.add(request_id)
                return True
            return False

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
        while self._take_new(waiting, block=not (running or waiting)):
            try:
                self._step(waiting, running)
            except Exception as e:  # unreachable unless a bug escapes the per-sequence guards
                log.exception("engine step failed")
                for seq in running:
                    self._fail(seq, RequestError(str(e)))
            running[:] = [seq for seq in running if not seq.done]  # their slots are free already (`_release`)
        for _, callback in waiting:  # shutting down: every accepted request still gets an answer
            _call(callback, StepOutput([], "", "error", Unavailable("the language model is shutting down")))
        for seq in running:
            if not seq.done:
                _call(seq.callback, StepOutput([], "", "cancelled"))
        self.runner.stop()

    def _step(self, waiting: deque, running: list[_Sequence]) -> None:
        """One iteration: new sequences are prefilled (each emits its first token), then every running
        sequence decodes one token. Each phase: schedule, run, postprocess."""
        admitted = self._schedule_prefill(waiting)
        running += admitted  # before anything can fail: each ends in `_fail` or a finish, and frees its slot
        self._waiting = len(waiting)
        self._postprocess(self._run(admitted, self._prefill_forward, "prefill"))
        for seq in admitted:
            seq.prompt = None  # prefilled: its inputs are no longer needed
        self._postprocess(self._run(self._schedule_decode(running), self._decode_forward, "decode"))

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

    # --- schedule -----------------------------------------------------------
    def _schedule_prefill(self, waiting: deque) -> list[_Sequence]:
        """Waiting requests that start now, each with its slot and prompt inputs: while slots are free and
        `max_prefill_tokens` allows (the first always goes). A cancelled request ends here; one whose
        inputs fail ends with its error; the others wait (admission control: queue, never fail)."""
        admitted: list[_Sequence] = []
        tokens = 0
        while waiting and self._slots.free:
            request, callback = waiting[0]
            if admitted and tokens + len(request.input_ids) > self.config.max_prefill_tokens:
                break
            waiting.popleft()
            if self._is_aborted(request.request_id):
                with self._lock:
                    self._aborted.discard(request.request_id)
                _call(callback, StepOutput([], "", "cancelled"))
                continue
            try:
                if len(request.input_ids) >= self.max_model_len:
                    raise InvalidRequest(f"the prompt is {len(request.input_ids)} tokens; "
                                         f"the model context is {self.max_model_len}")
                prompt = self.prompt_inputs(request)
            except Exception as e:  # a request's bad inputs fail that request only
                if not isinstance(e, RequestError):
                    log.exception("inputs of %s failed", request.request_id)
                    e = RequestError(str(e))
                _call(callback, StepOutput([], "", "error", e))
                continue
            admitted.append(_Sequence(request, callback, self._slots.take(), len(request.input_ids), prompt.delta,
                                      make_generator(request.sampling), IncrementalDetokenizer(self.tokenizer),
                                      StopStrings(request.sampling.stop), prompt=prompt))
            tokens += len(request.input_ids)
        self._prefill_tokens += tokens
        return admitted

    def _schedule_decode(self, running: list[_Sequence]) -> list[_Sequence]:
        """Every unfinished sequence, by slot (slots in a row are read as a view of the cache)."""
        active = sorted((seq for seq in running if not seq.done), key=lambda seq: seq.slot)
        self.peak_batch = max(self.peak_batch, len(active))
        self._decode_tokens += len(active)
        return active

    # --- run ----------------------------------------------------------------
    def _prefill_forward(self, group: list[_Sequence]) -> torch.Tensor:
        return self.runner.prefill([s.prompt for s in group], [s.slot for s in group])

    def _decode_forward(self, group: list[_Sequence]) -> torch.Tensor:
        return self.runner.decode([s.generated[-1] for s in group], [s.cached + s.delta for s in group],
                                  [s.slot for s in group], [s.cached for s in group])

    def _run(self, seqs: list[_Sequence], forward: Callable[[list[_Sequence]], torch.Tensor],
             what: str) -> list[tuple[_Sequence, torch.Tensor, int | None]]:
        """(sequence, logits row, its argmax) for `forward` over all of `seqs` at once; when that fails,
        each sequence alone, so a failure fails only the sequences that fail on their own."""
        if not seqs:
            return []
        rows = list(self._isolated(forward, seqs, what))
        greedy = torch.stack([row for _, row in rows]).argmax(dim=-1).tolist() if rows else []  # one call for all
        return [(seq, row, best) for (seq, row), best in zip(rows, greedy, strict=True)]

    def _isolated(self, forward: Callable[[list[_Sequence]], torch.Tensor], seqs: list[_Sequence],
                  what: str) -> Iterator[tuple[_Sequence, torch.Tensor]]:
        try:
            yield from zip(seqs, forward(seqs), strict=True)
            return
        except Exception as e:
            if len(seqs) == 1:
                log.exception("%s of %s failed", what, seqs[0].request.request_id)
                self._fail(seqs[0], RequestError(str(e)))
                return
            log.warning("batched %s of %d sequences failed (%s); running each alone", what, len(seqs), e)
        for seq in seqs:
            yield from self._isolated(forward, [seq], what)

    # --- postprocess ----------------------------------------------------------
    def _postprocess(self, rows: list[tuple[_Sequence, torch.Tensor, int | None]]) -> None:
        """Sample each sequence's token and emit it; an exception ends that sequence only."""
        for seq, logits, greedy in rows:
            try:
                self._sample_and_emit(seq, logits, greedy)
            except Exception as e:
                log.exception("sequence %s failed", seq.request.request_id)
                self._fail(seq, RequestError(str(e)))

    def _fail(self, seq: _Sequence, error: RequestError) -> None:
        """End `seq` with `error` unless it already ended; its slot goes back at once."""
        if seq.done:
            return
        seq.done = True
        self._release(seq)
        _call(seq.callback, StepOutput([], "", "error", error))

    def _release(self, seq: _Sequence) -> None:
        """A finished sequence gives its slot back, before its final output: whoever sees it sees the slot free."""
        self._slots.release(seq.slot)
        with self._lock:
            self._aborted.discard(seq.request.request_id)

    def prompt_inputs(self, req: LanguageRequest) -> PromptInputs:
        """Token embeddings with the image embeddings spliced over the image tokens, the image tokens'
        extra features, rotary positions and the position delta for decoding."""
        ids = torch.as_tensor(req.input_ids, dtype=torch.long)[None]  # [1, S]
        embeds = self.runner.embed(ids)  # [1, S, H]
        mask = (ids == self.family.image_token_id).to(embeds.device)
        rows = req.image_embeds.to(device=embeds.device, dtype=embeds.dtype)
        if int(mask.sum()) != rows.shape[0] or rows.shape[1] != self.family.embedding_width:
            raise InvalidRequest(f"the prompt has {int(mask.sum())} image tokens of width "
                                 f"{self.family.embedding_width}, but image embeddings {list(rows.shape)} came")
        image_embeds, extras = self.family.split_features(rows)
        embeds = embeds.masked_scatter(mask[..., None], image_embeds)
        positions, delta = self.family.positions(req.input_ids, req.image_grid_thw)
        at = mask[0].nonzero()[:, 0] if extras is not None else None
        return PromptInputs(embeds, torch.as_tensor(positions)[:, None, :], delta, at, extras)

    def _sample_and_emit(self, seq: _Sequence, logits: torch.Tensor, greedy: int | None) -> None:
        """logits: [V]; `greedy`: their argmax when the batch computed it already."""
        params = seq.request.sampling
        if len(seq.generated) < params.min_tokens:  # no EOS before min_tokens (HF's and vLLM's rule)
            logits = logits.clone()
            logits[list(self.eos_ids)] = float("-inf")
            greedy = None
        self._emit(seq, greedy if greedy is not None and params.greedy else sample(logits, params, seq.generator))

    def _emit(self, seq: _Sequence, token: int) -> None:
        seq.generated.append(token)
        finish = self._finish_reason(seq, token)
        text = seq.detok.add(token) + (seq.detok.flush() if finish else "")
        check = len(seq.generated) > seq.request.sampling.min_tokens  # the first min_tokens never stop
        text, hit_stop = seq.stops.feed(text, final=finish is not None, check=check)
        finish = "stop" if hit_stop else finish
        seq.done = finish is not None
        if seq.done:
            self._release(seq)
        else:
            self._slots.cached(seq.slot, seq.cached + 1)
        seq.callback(StepOutput([token], text, finish))  # raising here ends this sequence (`_postprocess`)

    def _finish_reason(self, seq: _Sequence, token: int) -> str | None:
        if token in self.eos_ids and not seq.request.sampling.ignore_eos:
            return "stop"
        if self._is_aborted(seq.request.request_id):
            return "cancelled"
        n = len(seq.generated)
        if n >= seq.request.sampling.max_tokens or seq.prompt_len + n >= self.max_model_len:
            return "length"
        return None


def _call(callback: Callback, out: StepOutput) -> None:
    """Hand an output to its request's callback; a failing callback (its client gone) hurts no other request."""
    try:
        callback(out)
    except Exception:
        log.exception("a request's callback failed")
