"""Prefill/decode disaggregation (E/P/D), the decode server's side: a prompt's KV from a prefill server.

A prefill server is any server with a `language_model` (`triton-vlm serve --mode prefill` runs only that):
a request that carries `_KV_FROM` is prefilled there and answered with the prompt's KV from that token on
and its first token, instead of being decoded (`engine/kv_handoff.py`). The request goes out with
everything the prefill engine needs: the prompt ids, the image embeddings (the decode server's encode stage
made or fetched them) with their layouts, so that the M-RoPE positions are computed there as here, the images'
content keys (its prefix cache), and the sampling parameters (a seeded sampler's state comes back with the KV).
`_KV_FROM` is the prefix this server has cached: only the rest of the KV comes back.

Transport: `grpc`, the KV as one raw byte tensor in the answer of a Triton gRPC stream (`kv_wire.py`), or
`nixl`, written into a buffer of ours by NIXL, the answer carrying its header alone (`kv_nixl.py`). Either
way the prefill server's blocks stay in its prefix cache, none is held for us. The least loaded healthy server
(load: prompt tokens in flight) takes a prompt; one that fails or does not answer within `timeout_s` is
marked down and the next is tried; when none is left the answer is None, and the caller prefills here.
A request's own fault (an invalid request) is raised as InvalidRequest: no other server would take it either.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from collections.abc import Callable

import numpy as np

from .. import interface as I
from ..errors import InvalidRequest, code_of, strip_label
from ..server_pool import ServerPool
from . import kv_wire
from .kv_handoff import PrefilledKV
from .kv_nixl import NixlTransport
from .sequence import LanguageRequest

log = logging.getLogger(__name__)

MODEL = "language_model"


class RemotePrefill(ServerPool):
    def __init__(self, urls: list[str], timeout_s: float = 60.0, retry_after_s: float = 5.0,
                 on_transfer: Callable[[int, float, str], None] = lambda nbytes, seconds, transport: None,
                 nixl: NixlTransport | None = None, kv_bytes_per_token: int = 0) -> None:
        """`nixl`: receive the KV by NIXL (buffers of `kv_bytes_per_token` per token), else inside the answer."""
        super().__init__(urls, MODEL, retry_after_s)  # the load in flight: prompt tokens
        self.timeout_s, self.on_transfer = timeout_s, on_transfer  # (bytes, seconds, transport) of each KV
        self.nixl, self.kv_bytes_per_token = nixl, kv_bytes_per_token
        self._introduced: set[str] = set()  # prefill servers that have loaded our NIXL agent's metadata

    def __call__(self, request: LanguageRequest, kv_from: int) -> PrefilledKV | None:
        """The KV of the prompt's tokens from `kv_from` on, its first token and the rest, from a prefill
        server; None when every one failed."""
        tried: set[str] = set()
        load = len(request.input_ids) - kv_from
        while (url := self.pick(tried, None, load)) is not None:
            tried.add(url)
            try:
                kv = self._remote(url, request, kv_from)
            except InvalidRequest:
                self.done(url, load, ok=True)
                raise
            except Exception as e:
                self.done(url, load, ok=False)
                self._introduced.discard(url)  # restarted, perhaps: it gets our metadata again
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                log.warning("prefill server %s failed (%s); marked down for %.0fs", url, reason, self.retry_after_s)
                continue
            self.done(url, load, ok=True)
            return kv
        return None

    def _remote(self, url: str, request: LanguageRequest, kv_from: int) -> PrefilledKV:
        import tritonclient.grpc as grpcclient

        def tensor(name, array):
            kind = I.spec(name)[0].removeprefix("TYPE_")
            t = grpcclient.InferInput(name, list(array.shape), "BYTES" if kind == "STRING" else kind)
            t.set_data_from_numpy(array)
            return t

        inputs = [tensor(I.INPUT_IDS, np.asarray(request.input_ids, np.int64).reshape(-1)),
                  tensor(I.IMAGE_EMBEDS, request.image_embeds.float().cpu().numpy()),
                  tensor(I.IMAGE_LAYOUT, np.asarray(request.image_grid_thw, np.int64).reshape(-1, 3)),
                  tensor(I.SAMPLING, np.array([request.sampling.to_json().encode()], dtype=np.object_)),
                  tensor(I.IMAGE_KEYS, np.array(list(request.image_keys), dtype=np.object_)),
                  tensor(I.KV_FROM, np.array([kv_from], np.int64))]
        inbox = None
        if self.nixl is not None:
            inbox = self.nixl.inbox((len(request.input_ids) - kv_from) * self.kv_bytes_per_token,
                                    with_metadata=url not in self._introduced)
        if inbox is not None:
            inputs.append(tensor(I.KV_TARGET, np.array([json.dumps(inbox.target).encode()], dtype=np.object_)))
        kv = None
        try:
            header, raw = self._ask(url, inputs, request.request_id, [I.KV_META] if inbox else [I.KV_META, I.KV])
            if inbox is not None:
                self._introduced.add(url)
                raw = inbox.wait(json.loads(header)["agent"], self.timeout_s).numpy()
            kv = kv_wire.unpack(raw, header)  # a copy: the region can go back
        finally:
            if inbox is not None:
                inbox.close(written=kv is not None)
        self.on_transfer(raw.nbytes, max(0.0, time.time() - kv_wire.sent_at(header)), "nixl" if inbox else "grpc")
        return kv

    def _ask(self, url: str, inputs: list, request_id: str, outputs: list[str]) -> tuple[bytes, np.ndarray | None]:
        """One request to a prefill server over a gRPC stream -> (the KV's header, the KV if it came inside)."""
        import tritonclient.grpc as grpcclient

        answers: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(url)
        try:
            client.start_stream(lambda result, error: answers.put((result, error)), stream_timeout=self.timeout_s)
            client.async_stream_infer(MODEL, inputs, request_id=request_id,
                                      outputs=[grpcclient.InferRequestedOutput(n) for n in outputs])
            try:
                result, error = answers.get(timeout=self.timeout_s)
            except queue.Empty:
                raise TimeoutError(f"no answer within {self.timeout_s:g}s") from None
        finally:
            client.stop_stream(cancel_requests=True)
            client.close()
        if error is not None:
            if code_of(error.message()) == InvalidRequest.code:  # a stream's errors have no status: the label
                raise InvalidRequest(strip_label(error.message()))
            raise error
        return result.as_numpy(I.KV_META).reshape(-1)[0], result.as_numpy(I.KV) if I.KV in outputs else None

