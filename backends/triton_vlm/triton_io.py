"""The one module of the package that speaks triton_python_backend_utils: tensors in and out, errors."""

from __future__ import annotations

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from .errors import RequestError

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def inputs(request, names) -> dict[str, np.ndarray]:
    """The named inputs the request carries, as numpy arrays (optional ones may be missing)."""
    found = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            found[name] = tensor.as_numpy()
    return found


def input_tensor(request, name) -> torch.Tensor:
    """A (possibly GPU) input as a torch tensor without a host copy (DLPack)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return torch.from_numpy(tensor.as_numpy()) if tensor.is_cpu() else torch.from_dlpack(tensor.to_dlpack())


def output(name: str, value) -> pb_utils.Tensor:
    if isinstance(value, torch.Tensor):
        if value.is_cuda:
            return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.contiguous()))
        value = value.numpy()
    return pb_utils.Tensor(name, np.ascontiguousarray(value))


def text_tensor(name: str, text: str) -> pb_utils.Tensor:
    return pb_utils.Tensor(name, np.array([text.encode("utf-8")], dtype=np.object_))


def error(e: Exception) -> pb_utils.TritonError:
    code = e.code if isinstance(e, RequestError) else "INTERNAL"
    return pb_utils.TritonError(str(e), getattr(pb_utils.TritonError, code, pb_utils.TritonError.INTERNAL))


def error_response(e: Exception) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(output_tensors=[], error=error(e))


def parameters(args: dict) -> dict[str, str]:
    import json

    from .config import read_parameters

    return read_parameters(json.loads(args["model_config"]))


def device(args: dict) -> str:
    """cuda:<id> for a KIND_GPU instance, else cpu."""
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args['model_instance_device_id']}"
    return "cpu"
