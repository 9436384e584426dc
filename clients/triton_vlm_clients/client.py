"""Call `vlm` (streaming, gRPC) and `vlm_unary` (infer, HTTP or gRPC) with tritonclient."""

from __future__ import annotations

import json
import queue
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STREAM_MODEL = "vlm"
UNARY_MODEL = "vlm_unary"
LANGUAGE_MODEL, CANCEL = "language_model", "cancel_request_id"  # the control request that ends a request


@dataclass
class Answer:
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    num_input_tokens: int = 0  # the prompt's tokens, image tokens included
    responses: int = 0
    ttft_s: float | None = None  # time to the first response carrying a token
    total_s: float = 0.0
    token_times_s: list[float] = field(default_factory=list)  # arrival of each token-carrying response
    tokens_per_response: list[int] = field(default_factory=list)


def read_image(source: str) -> bytes:
    """A local file's bytes, or the URL / data: URL itself (the server fetches it)."""
    if source.startswith(("http://", "https://", "data:")):
        return source.encode()
    return Path(source).read_bytes()


def build_inputs(module, **request) -> list:
    """InferInputs for the `vlm` interface (`request_tensors`); `module` is tritonclient.grpc or tritonclient.http."""
    return infer_inputs(module, request_tensors(**request))


def request_tensors(prompt: str | None = None, images: list[bytes] | None = None,
                    messages: list[dict] | str | None = None, stream: bool | None = None, stop: list[str] | None = None,
                    videos: list[bytes] | None = None, mm_processor_kwargs: dict | None = None,
                    **sampling) -> dict[str, np.ndarray]:
    """The `vlm` interface's tensors of one request. `messages`: chat messages, or their JSON text as it is;
    `mm_processor_kwargs`: the videos' sampling (fps, max_frames)."""
    tensors: dict[str, np.ndarray] = {}
    if prompt is not None:
        tensors["text_input"] = np.array([prompt.encode()], dtype=np.object_)
    if messages is not None:
        text = messages if isinstance(messages, str) else json.dumps(messages)
        tensors["messages"] = np.array([text.encode()], dtype=np.object_)
    if images:
        tensors["images"] = np.array(images, dtype=np.object_)
    if videos:
        tensors["videos"] = np.array(videos, dtype=np.object_)
    if mm_processor_kwargs is not None:
        tensors["mm_processor_kwargs"] = np.array([json.dumps(mm_processor_kwargs).encode()], dtype=np.object_)
    if stream is not None:
        tensors["stream"] = np.array([stream])
    if stop:
        tensors["stop"] = np.array([s.encode() for s in stop], dtype=np.object_)
    kinds = {"max_tokens": np.int32, "top_k": np.int32, "seed": np.int32, "min_tokens": np.int32,
             "temperature": np.float32, "top_p": np.float32, "ignore_eos": np.bool_, "chat_template": np.bool_}
    for name, value in sampling.items():
        if value is not None:
            tensors[name] = np.array([value], dtype=kinds[name])
    return tensors


def infer_inputs(module, tensors: dict[str, np.ndarray]) -> list:
    """{name: array} -> InferInputs of `module` (tritonclient.grpc or .http); object arrays as BYTES."""
    inputs = []
    for name, array in tensors.items():
        dtype = "BYTES" if array.dtype == np.object_ else module.np_to_triton_dtype(array.dtype)
        tensor = module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _decode(result) -> tuple[str, list[int], str, int]:
    text = result.as_numpy("text_output")
    ids = result.as_numpy("output_ids")
    finish = result.as_numpy("finish_reason")
    prompt = result.as_numpy("num_input_tokens")
    return (text.reshape(-1)[0].decode("utf-8", "replace") if text is not None else "",
            ids.tolist() if ids is not None else [],
            finish.reshape(-1)[0].decode() if finish is not None else "",
            int(prompt.reshape(-1)[0]) if prompt is not None else 0)


def stream(url: str, timeout_s: float = 300, on_delta=None, **request) -> Answer:
    """Send one request to `vlm` over a gRPC stream; collect the deltas (and pass each to on_delta)."""
    import tritonclient.grpc as grpcclient

    answer, events = Answer(), queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    start = time.perf_counter()
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    ended = False  # the server ended the request (an answer or an error): close the stream, cancel nothing
    request_id = uuid.uuid4().hex
    try:
        client.async_stream_infer(STREAM_MODEL, build_inputs(grpcclient, stream=True, **request), request_id=request_id)
        while True:
            result, error = events.get(timeout=timeout_s)
            if error is not None:
                ended = True
                raise error
            text, ids, finish, answer.num_input_tokens = _decode(result)
            answer.responses += 1
            if ids:
                answer.token_times_s.append(time.perf_counter() - start)
                answer.tokens_per_response.append(len(ids))
                answer.ttft_s = answer.token_times_s[0]
            answer.text += text
            answer.output_ids += ids
            if on_delta:
                on_delta(text, ids)
            if finish:
                answer.finish_reason = finish
                break
    finally:
        abandoned = not (ended or answer.finish_reason)
        client.stop_stream(cancel_requests=abandoned)
        client.close()
        if abandoned:
            cancel(url, request_id)
    answer.total_s = time.perf_counter() - start
    return answer


def cancel(url: str, request_id: str) -> None:
    """End a `vlm` request by its id. Needed besides cancelling the stream: Triton 2.51 does not pass a
    stream's cancel on to the ensemble step that already runs, so the language model would go on to the end."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: None)
        client.async_stream_infer(LANGUAGE_MODEL, infer_inputs(grpcclient, {
            CANCEL: np.array([request_id.encode()], dtype=np.object_)}))
        client.stop_stream()  # waits until the server has taken it
    finally:
        client.close()


def infer(url: str, protocol: str = "http", timeout_s: float = 300, **request) -> Answer:
    """One request to `vlm_unary` with plain infer(); the whole answer in one response."""
    if protocol == "http":
        import tritonclient.http as module

        client = module.InferenceServerClient(url, network_timeout=timeout_s, connection_timeout=timeout_s)
    else:
        import tritonclient.grpc as module

        client = module.InferenceServerClient(url)
    start = time.perf_counter()
    try:
        result = client.infer(UNARY_MODEL, build_inputs(module, **request))
    finally:
        client.close()
    text, ids, finish, prompt_tokens = _decode(result)
    elapsed = time.perf_counter() - start
    return Answer(text, ids, finish, prompt_tokens, 1, elapsed, elapsed)
