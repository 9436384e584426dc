"""A language request's outputs on their way back to Triton: one outbox thread sends every response, so
the engine thread never waits on Triton's IPC; it merges a request's queued deltas into one response
when it falls behind (fewer messages under load, no added latency when it keeps up). A stream that the
client left, or whose send fails, ends its generation (`engine.abort`).

Triton-free: the response sender (`send(response, flags)`, `is_cancelled()`) and a `wire` that builds
the responses (`response(ids, text, finish_reason, num_input_tokens, num_output_tokens)`,
`error(exception)`, `FINAL`) come from the model's adapter.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from ..engine.language import StepOutput


class Outbox:
    def __init__(self, after_sending: Callable[[], None] = lambda: None) -> None:
        self.after_sending = after_sending  # called once the outbox has sent what it had (metrics)
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="language-outbox", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        running = True
        while running:
            batch = [self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get())
            pending: dict = {}  # stream -> its merged output, in arrival order
            for item in batch:
                if item is None:
                    running = False
                    continue
                stream, out = item
                pending[stream] = merge(pending[stream], out) if stream in pending else out
            for stream, out in pending.items():
                stream.send(out)
            self.after_sending()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)


def merge(first: StepOutput, then: StepOutput) -> StepOutput:
    return StepOutput(first.token_ids + then.token_ids, first.text + then.text, then.finish_reason, then.error)


class ResponseStream:
    """One request's outputs: deltas when streaming, else one answer at the end; always one FINAL."""

    CANCEL_CHECK_S = 0.1  # is_cancelled() is a round trip to the server: ask at most this often

    def __init__(self, engine, outbox: Outbox, wire, sender, request_id: str, stream: bool, num_input_tokens: int,
                 arrival_s: float, metrics=None) -> None:
        self.engine, self.outbox, self.wire, self.sender = engine, outbox, wire, sender
        self.request_id, self.stream, self.num_input_tokens = request_id, stream, num_input_tokens
        self.arrival_s, self.metrics = arrival_s, metrics
        self.ids: list[int] = []
        self.text: list[str] = []
        self.checked = time.monotonic()

    def __call__(self, out: StepOutput) -> None:  # on the engine thread
        self.outbox.queue.put((self, out))

    def send(self, out: StepOutput) -> None:  # on the outbox thread
        if self.metrics is not None:
            if out.finished:  # an error's finish_reason is "error"
                self.metrics.ended(out.finish_reason)
            if out.token_ids and not self.ids:
                self.metrics.first_token(self.arrival_s)
        try:
            if out.error is not None:
                self.sender.send(self.wire.error(out.error), flags=self.wire.FINAL)
            else:
                self.ids += out.token_ids
                if self.stream:
                    self.sender.send(self.wire.response(out.token_ids, out.text, out.finish_reason,
                                                        self.num_input_tokens, len(self.ids)),
                                     flags=self.wire.FINAL if out.finished else 0)
                else:
                    self.text.append(out.text)
                    if out.finished:
                        self.sender.send(self.wire.response(self.ids, "".join(self.text), out.finish_reason,
                                                            self.num_input_tokens, len(self.ids)),
                                         flags=self.wire.FINAL)
            if not out.finished and time.monotonic() - self.checked > self.CANCEL_CHECK_S:
                self.checked = time.monotonic()
                if self.sender.is_cancelled():
                    self.engine.abort(self.request_id)
        except Exception:  # the client is gone: stop generating for it
            self.engine.abort(self.request_id)
