"""Encoder disaggregation (E/PD), the language server's side: run encoder shards on remote encoder servers.

Each encoder server runs `vision_encoder` (`triton-vlm serve --mode encoder`). A shard goes over Triton
gRPC (binary tensors) to the healthy encoder with the fewest shards in flight. If it times out or fails,
that encoder is marked down and the shard is retried on the next one, then on `fallback` (the local
`vision_encoder`) if there is one; only when every path fails does the request get UNAVAILABLE. A down
encoder is tried again after `retry_after_s` (a lazy probe: the next shard that finds it due).

Live scaling: `set_urls` adds and removes encoders while serving (shards in flight on a removed one
finish there); `watch` calls it whenever a file listing the encoders changes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from .errors import Unavailable

log = logging.getLogger(__name__)

Shard = Callable[[torch.Tensor, np.ndarray], torch.Tensor]


class RemoteEncoders:
    def __init__(self, urls: list[str], fallback: Shard | None = None, timeout_s: float = 60.0,
                 retry_after_s: float = 5.0) -> None:
        self.urls, self.fallback = list(urls), fallback
        self.timeout_s, self.retry_after_s = timeout_s, retry_after_s
        self._lock = threading.Lock()
        self.in_flight = {url: 0 for url in self.urls}
        self.down_until = {url: 0.0 for url in self.urls}
        self.shards_sent = {url: 0 for url in self.urls}  # per encoder, successful shards (a stat)
        self._local = threading.local()  # one gRPC client per thread and encoder

    def set_urls(self, urls: list[str]) -> None:
        with self._lock:
            for url in urls:
                self.in_flight.setdefault(url, 0)
                self.down_until.setdefault(url, 0.0)
                self.shards_sent.setdefault(url, 0)
            self.urls = list(dict.fromkeys(urls))

    def watch(self, path: str, on_change: Callable[[list[str]], None], interval_s: float = 1.0) -> threading.Thread:
        """Poll `path` (one HOST:PORT per line, # comments); on a change, `set_urls` and then `on_change`."""

        def read() -> list[str] | None:
            try:
                lines = open(path).read().splitlines()  # noqa: SIM115 (read at once)
            except OSError:
                return None
            return [u for u in (line.split("#")[0].strip() for line in lines) if u]

        def loop() -> None:
            last = None
            while True:
                urls = read()
                if urls is not None and urls != last:
                    last = urls
                    self.set_urls(urls)
                    on_change(urls)
                time.sleep(interval_s)

        thread = threading.Thread(target=loop, name="encoder-urls-watch", daemon=True)
        thread.start()
        return thread

    def probe(self, timeout_s: float = 2.0) -> dict[str, bool]:
        """Ask every encoder whether it is ready; mark the others down. -> {url: ready}."""
        import tritonclient.grpc as grpcclient

        ready = {}
        for url in self.urls:
            try:
                with grpcclient.InferenceServerClient(url) as client:
                    ready[url] = bool(client.is_model_ready("vision_encoder", client_timeout=timeout_s))
            except Exception:
                ready[url] = False
            if not ready[url]:
                with self._lock:
                    self.down_until[url] = time.monotonic() + self.retry_after_s
        return ready

    def healthy(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            return [u for u in self.urls if self.down_until[u] <= now]

    def _pick(self, tried: set[str]) -> str | None:
        now = time.monotonic()
        with self._lock:
            candidates = [u for u in self.urls if u not in tried and self.down_until[u] <= now]
            if not candidates:
                return None
            url = min(candidates, key=lambda u: (self.in_flight[u], self.urls.index(u)))
            self.in_flight[url] += 1
            return url

    def _client(self, url: str):
        import tritonclient.grpc as grpcclient

        clients = self._local.__dict__.setdefault("clients", {})
        if url not in clients:
            clients[url] = grpcclient.InferenceServerClient(url)
        return clients[url]

    def _remote(self, url: str, pixel_values: torch.Tensor, grid_thw: np.ndarray) -> torch.Tensor:
        import tritonclient.grpc as grpcclient

        inputs = []
        for name, array in (("_PIXEL_VALUES", pixel_values.cpu().numpy()), ("_IMAGE_GRID_THW", grid_thw)):
            tensor = grpcclient.InferInput(name, list(array.shape), grpcclient.np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(np.ascontiguousarray(array))
            inputs.append(tensor)
        result = self._client(url).infer("vision_encoder", inputs, client_timeout=self.timeout_s,
                                         outputs=[grpcclient.InferRequestedOutput("_IMAGE_EMBEDS")])
        return torch.from_numpy(result.as_numpy("_IMAGE_EMBEDS").copy())

    def __call__(self, pixel_values: torch.Tensor, grid_thw: np.ndarray) -> torch.Tensor:
        """Encode one shard somewhere; the first path that works wins."""
        tried: set[str] = set()
        errors = []
        while (url := self._pick(tried)) is not None:
            tried.add(url)
            try:
                embeds = self._remote(url, pixel_values, grid_thw)
            except Exception as e:
                with self._lock:
                    self.down_until[url] = time.monotonic() + self.retry_after_s
                errors.append(f"{url}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
                log.warning("encoder %s failed (%s); marked down for %.0fs", url, errors[-1], self.retry_after_s)
                self._local.__dict__.get("clients", {}).pop(url, None)
                continue
            finally:
                with self._lock:
                    self.in_flight[url] -= 1
            with self._lock:
                self.shards_sent[url] += 1
            return embeds
        if self.fallback is not None:
            return self.fallback(pixel_values, grid_thw)
        raise Unavailable("no encoder could encode the images" + (f": {'; '.join(errors)}" if errors else ""))
