"""Every stream `vlm` accepts ends, even when the language_model stub dies under it.

Triton 2.51's python backend hands each request's response factory to the stub and keeps no track of it: a stub
that dies (SIGKILL, the OOM killer, a crash in native code) takes the only means of ending its streams with it,
and the ensemble waits for them forever. So `vlm`'s last step is `language_relay`: it calls `language_model`
(BLS) and passes each response on, holding the client's response sender in a small process that runs no model.
Its `Relays` watch language_model's stubs; when one dies, every request relayed while it lived ends at once
with an error (the stub supervisor reloads the model, and the next request is served).

Triton-free: each request's `send(response, final)` and the error's `lost()` come from the adapter, and `live()`
lists the watched model's live stub processes (`stubs.live_stubs`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)
WATCH_S = 0.25  # how often the stubs are looked at: a lost stream ends within about this


class Relayed:
    """One request on its way back: where its responses go, and the stubs that may hold it."""

    def __init__(self, relays: Relays, send: Callable[[object, bool], None], stubs: frozenset[int]) -> None:
        self._relays, self._send, self.stubs = relays, send, stubs
        self._lock = threading.Lock()  # a lost stream's error never overtakes a response, nor follows the last
        self.ended = False

    def send(self, response, final: bool = False) -> bool:
        """Pass a response on (the last one `final`); -> False, sending nothing, once the request has ended
        (or the client is gone)."""
        with self._lock:
            if self.ended:
                return False
            self.ended = final
            try:
                self._send(response, final)
                sent = True
            except Exception:  # the client is gone: nothing more goes to it
                self.ended, sent = True, False
        if self.ended:
            self._relays.close(self)
        return sent


class Relays:
    def __init__(self, live: Callable[[], set[int]], lost: Callable[[], object], watch_s: float = WATCH_S) -> None:
        self.live, self.lost, self.watch_s = live, lost, watch_s
        self._lock = threading.Lock()
        self._stubs = frozenset(live())
        self._open: set[Relayed] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="relay-watch", daemon=True)

    def open(self, send: Callable[[object, bool], None]) -> Relayed:
        """A request about to be relayed: the stubs alive now are the ones that may take it."""
        with self._lock:
            relayed = Relayed(self, send, self._stubs)
            self._open.add(relayed)
        return relayed

    def close(self, relayed: Relayed) -> None:
        with self._lock:
            self._open.discard(relayed)

    def check(self) -> int:
        """One look at the stubs: end, with the `lost()` error, every request none of whose stubs lives. -> how
        many. (A request opened while no stub lived is not watched: Triton answers it with an error itself.)"""
        live = frozenset(self.live())
        with self._lock:
            self._stubs = live
            lost = [r for r in self._open if r.stubs and not r.stubs & live]
        return sum(r.send(self.lost(), final=True) for r in lost)

    def start(self) -> Relays:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _watch(self) -> None:
        while not self._stop.wait(self.watch_s):
            try:
                self.check()
            except Exception:  # the watch must never stop, nor take its stub down
                log.exception("relay watch failed")
