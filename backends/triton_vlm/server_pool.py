"""A pool of remote servers of one kind (E/PD's encoder servers, E/P/D's prefill servers): their addresses,
from a list or a watched file; each one's load in flight from this server and whether its last answer was
good; the pick of the least loaded healthy one. A server that fails is down for `retry_after_s`, then
tried again. Live scaling: `set_urls` adds and removes servers while serving (work in flight on a removed
one finishes there); `watch` calls it whenever the file changes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def read_urls_file(path: str) -> list[str] | None:
    """A server list file: one HOST:PORT per line, # comments. None while it cannot be opened (a file being
    replaced); ValueError if it is not UTF-8 text."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    return [u for u in (line.split("#")[0].strip() for line in lines) if u]


class ServerPool:
    def __init__(self, urls: list[str], model: str, retry_after_s: float = 5.0) -> None:
        self.model, self.retry_after_s = model, retry_after_s  # `model`: what a ready server serves
        self.urls: list[str] = []
        self._lock = threading.Lock()
        self.in_flight: dict[str, int] = {}  # the load each has from this server (tokens)
        self.down_until: dict[str, float] = {}
        self.answered: dict[str, bool] = {}  # whether its last answer (or probe) was good
        self.set_urls(urls)

    def set_urls(self, urls: list[str]) -> None:
        with self._lock:
            for url in urls:
                self.in_flight.setdefault(url, 0)
                self.down_until.setdefault(url, 0.0)
                self.answered.setdefault(url, True)
            self.urls = list(dict.fromkeys(urls))

    def start(self, urls_file: str, warn: Callable[[str], None], info: Callable[[str], None], what: str,
              instead: str) -> None:
        """Serving begins: the watched file's list (if any) replaces the URLs; servers that do not answer
        now are marked down and said so (`warn`: "<what> server URL is unreachable at start; <instead>"); the
        file is watched from now on, each change said with `info`."""
        listed = read_urls_file(urls_file) if urls_file else None
        if listed is not None:
            self.set_urls(listed)
        for url, ready in self.probe().items():
            if not ready:
                warn(f"{what} server {url} is unreachable at start; {instead}")
        if urls_file:
            self.watch(urls_file, lambda urls: info(f"{what} servers now: {', '.join(urls) or 'none'}"), warn)

    def watch(self, path: str, on_change: Callable[[list[str]], None], warn: Callable[[str], None],
              interval_s: float = 1.0) -> threading.Thread:
        """Poll `path` (`read_urls_file`); on a change, `set_urls` and then `on_change`. A list that cannot be
        used (or a failing `on_change`) is said once with `warn`, and the watch goes on."""

        def loop() -> None:
            last, failed = None, None
            while True:
                try:
                    urls = read_urls_file(path)
                    if urls is not None and urls != last:
                        last = urls
                        self.set_urls(urls)
                        on_change(urls)
                    failed = None
                except Exception as e:  # one bad read must not end the watch: the list would be frozen unsaid
                    if str(e) != failed:
                        warn(f"the server list {path} cannot be used ({e}); the servers stay "
                             f"{', '.join(self.urls) or 'none'}")
                    failed = str(e)
                time.sleep(interval_s)

        thread = threading.Thread(target=loop, name=f"{self.model}-urls-watch", daemon=True)
        thread.start()
        return thread

    def probe(self, timeout_s: float = 2.0) -> dict[str, bool]:
        """Ask every server whether its model is ready; mark the others down. -> {url: ready}."""
        import tritonclient.grpc as grpcclient

        ready = {}
        for url in list(self.urls):
            try:
                with grpcclient.InferenceServerClient(url) as client:
                    ready[url] = bool(client.is_model_ready(self.model, client_timeout=timeout_s))
            except Exception:
                ready[url] = False
            with self._lock:
                self.answered[url] = ready[url]
                if not ready[url]:
                    self.down_until[url] = time.monotonic() + self.retry_after_s
        return ready

    def healthy(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            return [u for u in self.urls if self.down_until[u] <= now]

    def state(self) -> dict[str, tuple[int, bool]]:
        """{url: (load in flight there, whether its last answer was good)} (the metrics' source)."""
        with self._lock:
            return {u: (self.in_flight[u], self.answered[u]) for u in self.urls}

    def pick(self, tried: set[str], prefer: str | None, load: int) -> str | None:
        """A healthy server not `tried` yet (`prefer` if it is one, else the least loaded), its load raised by
        `load` until `done`; None when there is none."""
        now = time.monotonic()
        with self._lock:
            candidates = [u for u in self.urls if u not in tried and self.down_until[u] <= now]
            if not candidates:
                return None
            url = prefer if prefer in candidates else min(candidates, key=lambda u: (self.in_flight[u],
                                                                                    self.urls.index(u)))
            self.in_flight[url] += load
            return url

    def done(self, url: str, load: int, ok: bool) -> None:
        """A pick's work ended: well (`ok`), or the server failed it and is down for a while."""
        with self._lock:
            self.in_flight[url] -= load
            self.answered[url] = ok
            if not ok:
                self.down_until[url] = time.monotonic() + self.retry_after_s


def grpc_status(error: Exception) -> str | None:
    """A tritonclient gRPC error's status ("StatusCode.INVALID_ARGUMENT"), or None."""
    status = getattr(error, "status", None)
    return status() if callable(status) else None
