"""Encoder disaggregation (E/PD), the language server's side: run encoder shards on remote encoder servers.

Each encoder server runs `image_encoder` (`triton-vlm serve --mode encoder`): the image files go out
over Triton gRPC, the server decodes, resizes, patchifies and encodes them, and the grids come back
as binary tensors. So do the embeddings, or through system shared memory for encoders on this host
(`transport` auto: loopback addresses; `shm_outputs.py`).

`split` gives each healthy encoder one shard, balanced by image tokens on top of the tokens it
already has in flight; small requests (under `local_below` pixel patches) stay here. An image that an encoder
encoded recently (by content key) goes back to it, where its embeddings are cached, unless that would
load it more than the image itself above the least-loaded encoder (Dynamo's cache-aware routing).
If a shard times out or fails, that encoder is marked down and the shard is retried on the next one, then on `fallback`
(the local encoder) if there is one; only when every path fails does the request get UNAVAILABLE.
A bad image is the request's fault, not the encoder's: INVALID_ARG goes back to the client at once.
A down encoder is tried again after `retry_after_s`.

The pool itself (addresses, a watched list file, load and health) is `server_pool.py`'s.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

from ..errors import InvalidRequest, Unavailable, strip_label
from ..preprocess.image_inputs import Images
from ..server_pool import ServerPool, grpc_status
from .balance import balance
from .shm_outputs import ShmOutputs

log = logging.getLogger(__name__)

LOCAL = "local"  # the target of a shard encoded on this server
MODEL = "image_encoder"
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
AFFINITY_KEYS = 65536  # image keys remembered for cache-aware routing


class RemoteEncoders(ServerPool):
    def __init__(self, urls: list[str], fallback: Callable[[Images], torch.Tensor] | None = None,
                 timeout_s: float = 60.0, retry_after_s: float = 5.0, local_below: int = 0,
                 transport: str = "grpc", embedding_bytes: Callable[[Images], int] | None = None) -> None:
        if transport not in ("auto", "grpc", "shm"):
            raise ValueError(f"transport must be auto, grpc or shm, got {transport!r}")
        if transport != "grpc" and embedding_bytes is None:
            raise ValueError("shared memory needs embedding_bytes (the size of a shard's embeddings)")
        super().__init__(urls, MODEL, retry_after_s)  # the load in flight: image tokens
        self.transport, self.embedding_bytes = transport, embedding_bytes
        self.shm = ShmOutputs() if transport != "grpc" else None
        self.fallback, self.timeout_s = fallback, timeout_s
        self.local_below = local_below if fallback is not None else 0
        self._local = threading.local()  # one gRPC client per thread and encoder
        self._encoded_by: OrderedDict[bytes, str] = OrderedDict()  # image key -> the encoder that last had it

    def split(self, images: Images) -> list[tuple[str | None, list[int]]]:
        """One shard per healthy encoder, balanced by tokens over the tokens each already has in flight;
        images an encoder has cached go to it while the balance allows."""
        weights, keys = images.tokens.tolist(), images.keys
        everything = list(range(len(weights)))
        if int(images.pixel_rows.sum()) < self.local_below:
            return [(LOCAL, everything)]
        healthy = self.healthy()
        if not healthy:
            return [(None, everything)]  # every encoder is down: __call__ finds what is left
        with self._lock:
            loads = {u: self.in_flight[u] for u in healthy}
            affine = {i: self._encoded_by.get(key) for i, key in enumerate(keys)}
        pinned: dict[str, list[int]] = {u: [] for u in healthy}
        rest = []
        for i in sorted(everything, key=lambda i: -weights[i]):
            url = affine.get(i)
            if url in loads and loads[url] <= min(loads.values()) + weights[i]:
                pinned[url].append(i)
                loads[url] += weights[i]
            else:
                rest.append(i)
        shards, _ = balance([weights[i] for i in rest], len(healthy), [loads[u] for u in healthy])
        return [(url, pinned[url] + [rest[j] for j in shard])
                for url, shard in zip(healthy, shards, strict=True) if pinned[url] or shard]

    def _remember(self, url: str, keys: tuple[bytes, ...]) -> None:
        with self._lock:
            for key in keys:
                self._encoded_by[key] = url
                self._encoded_by.move_to_end(key)
            while len(self._encoded_by) > AFFINITY_KEYS:
                self._encoded_by.popitem(last=False)

    def _client(self, url: str):
        import tritonclient.grpc as grpcclient

        clients = self._local.__dict__.setdefault("clients", {})
        if url not in clients:
            clients[url] = grpcclient.InferenceServerClient(url)
        return clients[url]

    def uses_shm(self, url: str) -> bool:
        return self.transport == "shm" or (self.transport == "auto" and url.rsplit(":", 1)[0] in LOOPBACK)

    def _remote(self, url: str, images: Images) -> torch.Tensor:
        import tritonclient.grpc as grpcclient

        client = self._client(url)
        files = grpcclient.InferInput("_IMAGES", [len(images.files)], "BYTES")
        files.set_data_from_numpy(np.array(images.files, dtype=np.object_))
        inputs = [files]
        if images.keys:  # the encoder server caches by them too
            keys = grpcclient.InferInput("_IMAGE_KEYS", [len(images.keys)], "BYTES")
            keys.set_data_from_numpy(np.array(images.keys, dtype=np.object_))
            inputs.append(keys)
        embeds = grpcclient.InferRequestedOutput("_IMAGE_EMBEDS")
        region = None
        if self.uses_shm(url):
            nbytes = self.embedding_bytes(images)
            region = self.shm.region(client, url, nbytes)
            embeds.set_shared_memory(region, nbytes)
        result = client.infer(MODEL, inputs, client_timeout=self.timeout_s,
                              outputs=[embeds, grpcclient.InferRequestedOutput("_IMAGE_LAYOUT")])
        grid = result.as_numpy("_IMAGE_LAYOUT")
        if not np.array_equal(grid.reshape(-1, 3), images.layout):
            raise RuntimeError(f"it returned image_grid_thw {grid.tolist()} for {images.layout.tolist()} "
                               "(a different model or image processor?)")
        if region is not None:
            return torch.from_numpy(self.shm.read(region, list(result.get_output("_IMAGE_EMBEDS").shape)))
        return torch.from_numpy(result.as_numpy("_IMAGE_EMBEDS").copy())

    def close(self) -> None:
        if self.shm is not None:
            self.shm.close()

    def __call__(self, images: Images, target: str | None = None) -> torch.Tensor:
        """Encode one shard: on `target` first, then on the other encoders, then locally."""
        if target == LOCAL:
            return self.fallback(images)
        tried: set[str] = set()
        errors = []
        tokens = int(images.tokens.sum())
        while (url := self.pick(tried, target, tokens)) is not None:
            tried.add(url)
            try:
                embeds = self._remote(url, images)
            except Exception as e:
                if grpc_status(e) == "StatusCode.INVALID_ARGUMENT":  # the images are bad, not the encoder
                    self.done(url, tokens, ok=True)
                    raise InvalidRequest(strip_label(e.message())) from None
                self.done(url, tokens, ok=False)
                errors.append(f"{url}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
                log.warning("encoder %s failed (%s); marked down for %.0fs", url, errors[-1], self.retry_after_s)
                if self.shm is not None:
                    self.shm.forget(url)
                self._local.__dict__.get("clients", {}).pop(url, None)
                continue
            self.done(url, tokens, ok=True)
            self._remember(url, images.keys)
            return embeds
        if self.fallback is not None:
            return self.fallback(images)
        raise Unavailable("no encoder could encode the images" + (f": {'; '.join(errors)}" if errors else ""))

