"""The `vlm` ensemble behind the front end: one gRPC channel (`tritonclient.grpc.aio`), one stream RPC per
request. Closing a request's iterator before its last answer cancels the request in Triton, which ends the
sequence and frees its KV slot."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
from tritonclient.utils import np_to_triton_dtype

from ..errors import code_of, strip_label
from ..interface import CANCEL
from .parse import APIError

MODEL = "vlm"
CANCEL_TIMEOUT_S = 10
log = logging.getLogger(__name__)
_STATUS = {"INVALID_ARG": (400, "invalid_request_error"), "UNAVAILABLE": (503, "service_unavailable")}


@dataclass
class Delta:
    """One answer from `vlm`: new text, and the token totals so far."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class Upstream:
    def __init__(self, url: str) -> None:
        import tritonclient.grpc.aio as grpcaio

        self.url = url
        self._module = grpcaio
        self.client = grpcaio.InferenceServerClient(url)
        self._cancelling: set[asyncio.Task] = set()  # control requests in flight (a task needs a reference)

    async def ready(self) -> bool:
        try:
            return await self.client.is_server_ready() and await self.client.is_model_ready(MODEL)
        except Exception:
            return False

    async def model_path(self) -> str | None:
        """The model folder the language model serves (its `model_path` parameter), if it says."""
        try:
            config = (await self.client.get_model_config("language_model", as_json=True))["config"]
        except Exception:
            return None
        return config.get("parameters", {}).get("model_path", {}).get("string_value") or None

    async def generate(self, tensors: dict[str, np.ndarray], request_id: str) -> AsyncIterator[Delta]:
        """`vlm`'s answers to one request, the last one with a finish_reason. Raises APIError for an error."""
        inputs = [self._input(name, array) for name, array in tensors.items()]
        answered = asyncio.Event()

        async def requests():
            yield {"model_name": MODEL, "inputs": inputs, "request_id": request_id}
            await answered.wait()  # the stream stays open until the last answer: then it closes, not cancels

        call = self.client.stream_infer(requests())
        try:
            async for result, error in call:
                if error is not None:
                    answered.set()
                    raise api_error(error.message())
                delta = _delta(result)
                if delta.finish_reason:
                    answered.set()
                yield delta
                if answered.is_set():
                    return
            raise APIError("the server ended the stream without an answer", 502, "upstream_error")
        except grpc.RpcError as e:  # the channel: the server is down or unreachable
            raise api_error(f"unavailable: {e.details() if hasattr(e, 'details') else e}") from None
        finally:
            if not answered.is_set():  # the client left (or we failed) mid-request: cancel it in Triton
                answered.set()
                call.cancel()
                # and end it by id: Triton 2.51 does not pass the stream's cancel on to a running ensemble
                # step. On a task of its own: this one may be cancelled already (a client that left).
                task = asyncio.get_running_loop().create_task(self._cancel(request_id))
                self._cancelling.add(task)
                task.add_done_callback(self._cancelling.discard)

    async def _cancel(self, request_id: str) -> None:
        async def requests():
            yield {"model_name": "language_model", "inputs": [self._input(CANCEL, np.array([request_id.encode()],
                                                                                           dtype=np.object_))]}

        async def send() -> None:
            async for _ in self.client.stream_infer(requests()):
                pass

        try:
            await asyncio.wait_for(send(), CANCEL_TIMEOUT_S)
        except Exception as e:  # the request ends at max_tokens instead: nothing is lost
            log.warning("cancelling request %s failed: %s", request_id, e)

    def _input(self, name: str, array: np.ndarray):
        dtype = "BYTES" if array.dtype == np.object_ else np_to_triton_dtype(array.dtype)
        tensor = self._module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        return tensor

    async def close(self) -> None:
        await self.client.close()


def _delta(result) -> Delta:
    def scalar(name: str):
        value = result.as_numpy(name)
        return None if value is None or value.size == 0 else value.reshape(-1)[0]

    text, finish = scalar("text_output") or b"", scalar("finish_reason") or b""
    return Delta(text.decode("utf-8", "replace"), finish.decode() or None,
                 int(scalar("num_input_tokens") or 0), int(scalar("num_output_tokens") or 0))


def api_error(message: str) -> APIError:
    """A `vlm` error message -> the OpenAI error: its label (errors.py) gives the status; a request's own
    fault is a 400, never a 500."""
    status, kind = _STATUS.get(code_of(message), (500, "internal_server_error"))
    return APIError(strip_label(message), status, kind)
