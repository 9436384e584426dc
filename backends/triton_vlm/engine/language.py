"""Language engine: prompt ids + image embeddings in, streamed tokens and text out, with continuous
batching, chunked prefill and prefix caching over a paged KV cache, on a tensor-parallel decoder.

One engine thread owns the model (rank 0; ranks 1..N-1 are worker processes that mirror each step).
`submit` returns a handle (the `Sequence`, with `cancel()`) at once. Each step (nano-vllm's): the
scheduler picks the sequences and their new tokens (`scheduler.py`), the runner runs the prefill chunks in
one forward and the decodes in another (`runner.py`), and each sequence whose tokens are all computed
samples its next one and emits it (`sequence.py` decides when it ends).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator

import torch
from transformers import AutoTokenizer

from ..config import LanguageConfig, torch_dtype, usable_cores
from ..errors import InvalidRequest, RequestError, Unavailable
from ..models import load_family
from . import kv_handoff
from .block_manager import BlockManager
from .kv_handoff import PrefilledKV
from .runner import ModelRunner, kv_budget
from .sampling import next_token
from .scheduler import Scheduler
from .sequence import Callback, LanguageRequest, Sequence, Status, StepOutput, deliver, eos_token_ids
from .stats import EngineStats
from .tp_worker import start_workers, stop_workers

__all__ = ["EngineStats", "LanguageEngine", "LanguageRequest", "PrefilledKV", "StepOutput"]

log = logging.getLogger(__name__)


class LanguageEngine:
    def __init__(self, config: LanguageConfig) -> None:
        self.config = config
        self.family = load_family(config.model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_path)
        self.eos_ids = eos_token_ids(config.model_path, self.tokenizer)
        tp_size = config.tensor_parallel
        threads = config.threads or max(1, usable_cores() // tp_size)
        dtype = torch_dtype(config.dtype, config.device)
        self.block_size = config.block_size
        self.num_blocks, context = kv_budget(self.family, config, dtype)
        self.max_model_len = min(context, self.num_blocks * self.block_size)  # one sequence always fits the pool
        self._limit = (f"the model context is {context}" if self.max_model_len == context else
                       f"the KV cache holds {self.max_model_len} tokens (kv_cache_mb {config.kv_cache_mb} per rank)")
        init_method, self._workers = start_workers(tp_size, config.model_path, config.device, config.dtype,
                                                   self.num_blocks, self.block_size, threads)
        self.blocks = BlockManager(self.num_blocks, self.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self._queue: queue.Queue[Sequence | None] = queue.Queue()
        self.peak_batch = 0  # the most sequences in one step so far (an engine stat)
        self._prefill_tokens = self._decode_tokens = 0  # the engine thread alone writes these
        self._imported_tokens = 0  # prompt tokens whose KV came from hand-offs (not computed here)
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
        from ..models.tp import init

        torch.set_num_threads(threads)  # on the thread that runs the model
        try:
            tp = init(0, self.config.tensor_parallel, init_method, self.config.device)
            self.runner = ModelRunner(self.family, self.config.device, dtype, tp, self.num_blocks, self.block_size)
        except BaseException as e:
            built.put(e)
            return
        built.put(None)
        self._loop()

    # --- public API ---------------------------------------------------------
    def submit(self, request: LanguageRequest, callback: Callback) -> Sequence | None:
        """Queue a request -> its handle (`cancel()`); None when it was refused at once (the callback got
        its error). Every request ends with exactly one finished output."""
        try:
            if not len(request.input_ids):
                raise InvalidRequest("the prompt is empty")
            if len(request.input_ids) >= self.max_model_len:  # it could never run, even alone
                raise InvalidRequest(f"the prompt is {len(request.input_ids)} tokens; {self._limit}")
            seq = Sequence(request, callback, self.family, self.tokenizer, self.block_size, self.max_model_len)
        except Exception as e:  # a request's bad inputs fail that request only
            if not isinstance(e, RequestError):
                log.exception("inputs of %s failed", request.request_id)
            deliver(callback, StepOutput([], "", "error", e if isinstance(e, RequestError) else RequestError(str(e))))
            return None
        self._queue.put(seq)
        return seq

    def generate(self, request: LanguageRequest) -> Iterator[StepOutput]:
        """Blocking iterator over a request's outputs (tests and in-process callers)."""
        outputs: queue.Queue[StepOutput] = queue.Queue()
        self.submit(request, outputs.put)
        while True:
            out = outputs.get()
            yield out
            if out.finished:
                return

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(len(s.running), len(s.waiting) + self._queue.qsize(), self._prefill_tokens,
                           self._decode_tokens, self.blocks.in_use, self.num_blocks, s.prefix_queries,
                           s.prefix_hits, s.preemptions, self._imported_tokens)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of one token's keys and values, every layer and head (a hand-off's size per token)."""
        k = self.runner.cache.k
        return 2 * k.shape[0] * k.shape[2] * self.runner.tp.size * k.shape[3] * k.element_size()

    def cached_prefix(self, request: LanguageRequest) -> int:
        """How many of the prompt's leading tokens this engine has cached now (a hint from another thread:
        by the time the request is admitted, some may be evicted; or 0 when its inputs are bad)."""
        try:
            seq = Sequence(request, lambda out: None, self.family, self.tokenizer, self.block_size, self.max_model_len)
        except Exception:
            return 0
        return len(self.blocks.cached_chain(seq)) * self.block_size

    def shutdown(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)
        stop_workers(self._workers)
        self.runner.tp.close()

    # --- engine thread ------------------------------------------------------
    def _loop(self) -> None:
        while self._take_new(block=not self.scheduler.has_work):
            try:
                self.step()
            except Exception as e:  # unreachable unless a bug escapes the per-sequence guards
                log.exception("engine step failed")
                for seq in list(self.scheduler.running):
                    self._end(seq, StepOutput([], "", "error", RequestError(str(e))))
        for seq in list(self.scheduler.waiting):  # shutting down: every accepted request still gets an answer
            self._end(seq, StepOutput([], "", "error", Unavailable("the language model is shutting down")))
        for seq in list(self.scheduler.running):
            self._end(seq, StepOutput([], "", "cancelled"))
        self.runner.stop()

    def _take_new(self, block: bool) -> bool:
        """Move submitted sequences into the scheduler (waiting for one only if `block`); False on shutdown."""
        try:
            seq = self._queue.get(block=block)
            while seq is not None:
                self.scheduler.add(seq)
                seq = self._queue.get_nowait()
            return False
        except queue.Empty:
            return True

    def step(self) -> None:
        scheduled, cancelled = self.scheduler.schedule()
        for seq in cancelled:
            deliver(seq.callback, StepOutput([], "", "cancelled"))
        decodes, prefills = [], []  # a decode is one generated token; a prompt's chunks (or a recompute) prefill
        for seq, n in scheduled:
            if seq.prefilled is not None:
                if seq.num_computed >= seq.prefilled.start:
                    self._install(seq, n)
                    continue
                log.info("%s: the prefix its hand-off leaves out was evicted here; prefilling it here",
                         seq.request_id)
                seq.prefilled = None
            (decodes if n == 1 and seq.num_computed >= seq.num_prompt_tokens else prefills).append((seq, n))
        self.peak_batch = max(self.peak_batch, len(scheduled))
        rows = self._run(prefills, self._prefill, "prefill") + self._run(decodes, self._decode, "decode")
        self._postprocess(rows)

    def _install(self, seq: Sequence, n: int) -> None:
        """A hand-off's prompt KV into the blocks the sequence was given (past its cached prefix), then its
        first token: it decodes from the next step on. A failure ends this sequence only."""
        try:
            kv, cache = seq.prefilled, self.runner.cache
            kv_handoff.check(kv, cache.k.shape[0], cache.k.shape[2] * self.runner.tp.size, cache.k.shape[3],
                             cache.k.dtype)  # before any rank writes
            skip = seq.num_computed - kv.start  # what this engine has cached beyond what the hand-off left out
            self.runner.write_kv(seq.block_table, seq.num_computed, kv.keys[:, skip:], kv.values[:, skip:])
            self._imported_tokens += n
            seq.num_computed += n
            self.blocks.commit(seq)
            first, seq.prefilled = seq.prefilled.first_token, None  # a preempted sequence recomputes instead
            out = seq.append(first, self.eos_ids)
            if out.finished:
                self.scheduler.finish(seq)
            seq.callback(out)
        except Exception as e:
            if not isinstance(e, RequestError):
                log.exception("installing the KV of %s failed", seq.request_id)
            self._end(seq, StepOutput([], "", "error", e if isinstance(e, RequestError) else RequestError(str(e))))

    def _handoff(self, seq: Sequence, out: StepOutput) -> StepOutput:
        """A prefill-only sequence's first token: end it with its prompt's KV (its blocks stay cached here)."""
        keys, values = self.runner.read_kv(seq.block_table, seq.kv_from, seq.num_prompt_tokens)
        state = seq.generator.get_state() if seq.generator is not None else None
        handoff = PrefilledKV(keys, values, out.token_ids[0], seq.delta, state, seq.kv_from)
        self.scheduler.finish(seq)
        return StepOutput(out.token_ids, out.text, "prefilled", handoff=handoff)

    def _prefill(self, group: list[tuple[Sequence, int]]) -> torch.Tensor:
        return self.runner.prefill([self.runner.chunk(seq, n) for seq, n in group])

    def _decode(self, group: list[tuple[Sequence, int]]) -> torch.Tensor:
        seqs = [seq for seq, _ in group]
        return self.runner.decode([s.token_ids[-1] for s in seqs], [s.num_computed + s.delta for s in seqs],
                                  [s.block_table for s in seqs], [s.num_computed for s in seqs])

    def _run(self, group: list[tuple[Sequence, int]], forward, what: str) -> list[tuple[Sequence, int, torch.Tensor]]:
        """(sequence, its new tokens, logits row) for `forward` over the whole group; when that fails, each
        sequence alone, so a failure fails only the sequences that fail on their own."""
        if not group:
            return []
        try:
            return [(seq, n, row) for (seq, n), row in zip(group, forward(group), strict=True)]
        except Exception as e:
            if len(group) == 1:
                log.exception("%s of %s failed", what, group[0][0].request_id)
                self._end(group[0][0], StepOutput([], "", "error", RequestError(str(e))))
                return []
            log.warning("batched %s of %d sequences failed (%s); running each alone", what, len(group), e)
        return [row for item in group for row in self._run([item], forward, what)]

    def _postprocess(self, rows: list[tuple[Sequence, int, torch.Tensor]]) -> None:
        """Each sequence's tokens are computed; one whose tokens all are samples and emits its next token
        (a partly prefilled prompt does not). An exception ends that sequence only."""
        ready = []
        for seq, n, logits in rows:
            if seq.num_computed < seq.num_prompt_tokens:
                self._prefill_tokens += min(n, seq.num_prompt_tokens - seq.num_computed)
            self._decode_tokens += n if seq.num_computed >= seq.num_prompt_tokens else 0
            seq.num_computed += n
            self.blocks.commit(seq)
            if seq.num_computed == seq.num_tokens:
                ready.append((seq, logits))
        greedy = torch.stack([logits for _, logits in ready]).argmax(dim=-1).tolist() if ready else []  # one call
        for (seq, logits), best in zip(ready, greedy, strict=True):
            try:
                banned = self.eos_ids if seq.num_generated < seq.sampling.min_tokens else set()
                out = seq.append(next_token(logits, seq.sampling, seq.generator, best, banned), self.eos_ids)
                if seq.prefill_only and not out.finished:
                    out = self._handoff(seq, out)
                elif out.finished:
                    self.scheduler.finish(seq)  # its blocks are free before whoever sees the end looks
                seq.callback(out)  # raising here ends this sequence
            except Exception as e:
                log.exception("sequence %s failed", seq.request_id)
                self._end(seq, StepOutput([], "", "error", RequestError(str(e))))

    def _end(self, seq: Sequence, out: StepOutput) -> None:
        """End `seq` with `out` unless it ended already; its blocks go back first."""
        if seq.status is Status.FINISHED:
            return
        self.scheduler.finish(seq)
        deliver(seq.callback, out)
