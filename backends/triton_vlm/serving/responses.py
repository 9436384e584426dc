"""A language request's outputs on their way back to Triton: one outbox thread sends every response, so
the engine thread never waits on Triton's IPC; it merges a request's queued deltas into one response
when it falls behind (fewer messages under load, no added latency when it keeps up). A stream that the
client left, or whose send fails, ends its generation (its engine handle's `cancel()`); `InFlight` finds
the streams of a request id for a `cancel_request_id`. Nothing a send or a metric raises stops the outbox
thread (it is every stream's way out): it is logged, and the next responses go.

Triton-free: the response sender (`send(response, flags)`, `is_cancelled()`) comes from the model's
adapter, and a `wire` builds the responses (`response(ids, text, finish_reason, num_input_tokens,
num_output_tokens)`, `error(exception)`, `handoff(prefilled_kv)`, `FINAL`; Triton's is
`triton_io.LanguageWire`).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable

from ..engine.sequence import StepOutput
from ..errors import RequestError

log = logging.getLogger(__name__)


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
                _logged(stream.send, out)
            _logged(self.after_sending)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)


def _logged(call: Callable, *args) -> None:
    """The outbox thread sends every stream's responses: nothing one call raises may end it."""
    try:
        call(*args)
    except Exception:
        log.exception("triton-vlm: the language outbox caught")


def merge(first: StepOutput, then: StepOutput) -> StepOutput:
    return StepOutput(first.token_ids + then.token_ids, first.text + then.text, then.finish_reason, then.error,
                      then.handoff)


class InFlight:
    """Request id -> its unfinished response streams (ids are the clients' and need not be unique)."""

    def __init__(self) -> None:
        self._streams: dict[str, set] = {}
        self._lock = threading.Lock()

    def add(self, stream: ResponseStream) -> None:
        with self._lock:
            self._streams.setdefault(stream.request_id, set()).add(stream)

    def discard(self, stream: ResponseStream) -> None:
        with self._lock:
            streams = self._streams.get(stream.request_id, set())
            streams.discard(stream)
            if not streams:
                self._streams.pop(stream.request_id, None)

    def cancel(self, request_id: str) -> bool:
        """End the unfinished requests with this id ("cancelled"). -> False if there is none (an id that
        finished, or never came, must not cancel a later request that reuses it)."""
        with self._lock:
            streams = list(self._streams.get(request_id, ()))
        for stream in streams:
            stream.cancel()
        return bool(streams)


class ResponseStream:
    """One request's outputs: deltas when streaming, else one answer at the end; always one FINAL."""

    CANCEL_CHECK_S = 0.1  # is_cancelled() is a round trip to the server: ask at most this often

    def __init__(self, outbox: Outbox, wire, sender, request_id: str, stream: bool, num_input_tokens: int,
                 arrival_s: float, metrics=None, in_flight: InFlight | None = None) -> None:
        self.outbox, self.wire, self.sender, self.in_flight = outbox, wire, sender, in_flight
        self.request_id, self.stream, self.num_input_tokens = request_id, stream, num_input_tokens
        self.arrival_s, self.metrics = arrival_s, metrics
        self.ids: list[int] = []
        self.text: list[str] = []
        self.checked = time.monotonic()
        self.handle, self.cancelled = None, False  # the engine's handle (`cancel()`), once submitted
        if in_flight is not None:
            in_flight.add(self)

    def attach(self, handle) -> None:
        """The engine's handle of this request (None if it refused it); a cancel that came first applies now."""
        self.handle = handle
        if self.cancelled and handle is not None:
            handle.cancel()

    def _count(self, out: StepOutput) -> None:
        if out.finished:  # an error's finish_reason is "error"
            self.metrics.ended(out.finish_reason)
        if out.token_ids and not self.ids:
            self.metrics.first_token(self.arrival_s)

    def cancel(self) -> None:
        self.cancelled = True
        if self.handle is not None:
            self.handle.cancel()

    def __call__(self, out: StepOutput) -> None:  # on the engine thread
        self.outbox.queue.put((self, out))

    def send(self, out: StepOutput) -> None:  # on the outbox thread
        if out.finished and self.in_flight is not None:
            self.in_flight.discard(self)
        if self.metrics is not None:
            _logged(self._count, out)
        try:
            if out.error is not None:
                self.sender.send(self.wire.error(out.error), flags=self.wire.FINAL)
            elif out.handoff is not None:  # a prefill server's answer (E/P/D): the prompt's KV and first token
                self.sender.send(self.wire.handoff(out.handoff), flags=self.wire.FINAL)
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
                    self.cancel()
        except Exception as e:  # the client is gone: stop generating for it
            self.cancel()
            if out.finished and out.error is None:  # or the answer could not be built: it still gets an end
                with contextlib.suppress(Exception):  # unless the client is gone
                    self.sender.send(self.wire.error(RequestError(f"the answer could not be sent: {e}")),
                                     flags=self.wire.FINAL)
