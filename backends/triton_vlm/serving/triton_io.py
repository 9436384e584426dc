"""Where the package speaks triton_python_backend_utils: tensors in and out, errors (and `metrics.py`)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import triton_python_backend_utils as pb_utils

from .. import interface as I
from ..errors import RequestError, code_of, kind_of
from .retry import retry

if TYPE_CHECKING:
    import torch

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
log = logging.getLogger(__name__)


def inputs(request, names) -> dict[str, np.ndarray]:
    """The named inputs the request carries, as numpy arrays (optional ones may be missing)."""
    found = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            found[name] = tensor.as_numpy()
    return found


def to_torch(tensor: pb_utils.Tensor) -> torch.Tensor:
    """A (possibly GPU) tensor as a torch tensor without a host copy (DLPack on GPU)."""
    import torch  # here, not at the top: stubs that only forward tensors (vlm_unary) start without torch

    return torch.from_numpy(tensor.as_numpy()) if tensor.is_cpu() else torch.from_dlpack(tensor.to_dlpack())


def input_tensor(request, name) -> torch.Tensor:
    return to_torch(pb_utils.get_input_tensor_by_name(request, name))


def infer(model_name: str, inputs: list[pb_utils.Tensor], output_names: list[str]) -> dict[str, torch.Tensor]:
    """One BLS call to another model of this server; its error raised as a RuntimeError."""
    response = pb_utils.InferenceRequest(model_name=model_name, inputs=inputs,
                                         requested_output_names=output_names).exec()
    if response.has_error():
        raise RuntimeError(f"{model_name}: {response.error().message()}")
    return {name: to_torch(pb_utils.get_output_tensor_by_name(response, name)) for name in output_names}


def encode_on_replicas(pixel_values, grid_thw) -> torch.Tensor:
    """Image embeddings from this server's `vision_encoder` (BLS: Triton picks a replica). A replica whose
    stub died fails at once; the shard is tried again until a healthy (or reloaded) replica takes it."""
    inputs = [output(I.PIXEL_VALUES, pixel_values), output(I.IMAGE_LAYOUT, grid_thw)]
    return retry(lambda: infer("vision_encoder", inputs, [I.IMAGE_EMBEDS])[I.IMAGE_EMBEDS], replica_down)


def replica_down(e: Exception) -> bool:
    """Whether a BLS error says the instance itself is gone (its stub died, or the model is reloading),
    rather than anything about the request: the python backend's own messages are all there is."""
    return any(s in str(e) for s in ("is not healthy", "Failed to obtain the health mutex", "is not ready"))


def supervise():
    """Start this stub's supervisor: dead stubs of the server get their model reloaded; orphans exit."""
    from .supervisor import StubSupervisor

    return StubSupervisor(lambda model: pb_utils.load_model(model_name=model)).start()


def output(name: str, value) -> pb_utils.Tensor:
    torch = sys.modules.get("torch")  # never imported here: a stub that has no tensors has no torch
    if torch is not None and isinstance(value, torch.Tensor):
        if value.is_cuda:
            return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.contiguous()))
        value = value.numpy()
    return pb_utils.Tensor(name, np.ascontiguousarray(value))


def text_tensor(name: str, text: str) -> pb_utils.Tensor:
    return bytes_tensor(name, [text.encode("utf-8")])


def bytes_tensor(name: str, items) -> pb_utils.Tensor:
    """A BYTES tensor [len(items)] (it may be empty)."""
    array = np.empty(len(items), dtype=np.object_)
    array[:] = list(items)
    return pb_utils.Tensor(name, array)


def error(e: Exception) -> pb_utils.TritonError:
    """A request error as Triton's error: its code, and its message with the label that names the code."""
    if not isinstance(e, RequestError):
        e = RequestError(str(e))
    return pb_utils.TritonError(e.wire_message, getattr(pb_utils.TritonError, e.code, pb_utils.TritonError.INTERNAL))


def error_from_bls(e: pb_utils.TritonError) -> pb_utils.TritonError:
    """A step's error as BLS handed it over (code INTERNAL in Triton 2.51), with its code read back."""
    return pb_utils.TritonError(e.message(), getattr(pb_utils.TritonError, code_of(e.message())))


def error_response(e: Exception, stage: str = "") -> pb_utils.InferenceResponse:
    """The error answer of one request; with `stage` (a step that answers the client's request), counted in
    triton_vlm_request_errors_total{stage, kind}."""
    if stage:
        from .metrics import request_errors

        try:
            request_errors()(stage=stage, kind=kind_of(e)).increment(1)
        except Exception:  # a count is worth less than the answer it would cost
            log.exception("could not count a %s error", stage)
    return pb_utils.InferenceResponse(output_tensors=[], error=error(e))


def answer(sender, stage: str, failed: Exception | None, build: Callable[[], pb_utils.InferenceResponse]) -> None:
    """A request's one FINAL answer, from whichever thread finished its work: `build()`'s response, or the
    error response for `failed`, or for what `build` raised."""
    try:
        if failed is not None:
            raise failed
        response = build()
    except Exception as e:
        response = error_response(e, stage)
    sender.send(response, flags=FINAL)


def parameters(args: dict) -> dict[str, str]:
    from ..config import read_parameters

    return read_parameters(json.loads(args["model_config"]))


def instance_count(args: dict) -> int:
    """How many instances of this model the server runs (count is per GPU on KIND_GPU groups)."""
    groups = json.loads(args["model_config"]).get("instance_group", [])
    return sum(int(g.get("count", 1)) * max(1, len(g.get("gpus", []))) for g in groups) or 1


def device(args: dict) -> str:
    """cuda:<id> for a KIND_GPU instance, else cpu."""
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args['model_instance_device_id']}"
    return "cpu"


class LanguageWire:
    """The language model's responses (`serving.responses` sends them)."""

    FINAL = FINAL

    @staticmethod
    def response(ids, text: str, finish_reason: str | None, num_input_tokens: int,
                 num_output_tokens: int) -> pb_utils.InferenceResponse:
        return pb_utils.InferenceResponse([
            text_tensor("text_output", text),
            output("output_ids", np.asarray(ids, dtype=np.int64)),
            text_tensor("finish_reason", finish_reason or ""),
            output("num_input_tokens", np.array([num_input_tokens], dtype=np.int32)),
            output("num_output_tokens", np.array([num_output_tokens], dtype=np.int32)),
        ])

    @staticmethod
    def handoff(kv) -> pb_utils.InferenceResponse:
        """A prefill server's answer: the `PrefilledKV` (`engine/kv_wire.py`)."""
        from ..engine import kv_wire

        raw, header = kv_wire.pack(kv)
        return pb_utils.InferenceResponse([output(I.KV, raw), bytes_tensor(I.KV_META, [header]),
                                           output("output_ids", np.array([kv.first_token], dtype=np.int64)),
                                           text_tensor("finish_reason", "prefilled")])

    @staticmethod
    def error(e: Exception) -> pb_utils.InferenceResponse:
        return error_response(e, "language_model")


class NixlWire(LanguageWire):
    """A prefill request whose KV goes by NIXL (`engine/kv_nixl.py`): written into the decode server's buffer
    (`target`); the answer carries the header (with this server's agent, whose notification to wait for)."""

    def __init__(self, transport, target: dict) -> None:
        self.transport, self.target = transport, target

    def handoff(self, kv) -> pb_utils.InferenceResponse:
        import torch

        from ..engine import kv_wire

        raw, header = kv_wire.pack(kv, agent=self.transport.name)
        self.transport.write(torch.from_numpy(raw), self.target)
        return pb_utils.InferenceResponse([bytes_tensor(I.KV_META, [header]),
                                           output("output_ids", np.array([kv.first_token], dtype=np.int64)),
                                           text_tensor("finish_reason", "prefilled")])
