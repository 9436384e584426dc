"""OpenAI request bodies -> the `vlm` ensemble's input tensors. Type errors are refused here (HTTP 400);
value ranges (temperature, top_p, seed, ...) are checked by the server itself, whose errors come back as
400 too, so one rule holds for every client."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

INT32_MAX = 2**31 - 1
UNTIL_CONTEXT_ENDS = INT32_MAX  # max_tokens left out: generate until EOS or the context is full (vLLM's rule)
UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "functions", "response_format", "echo", "suffix", "best_of",
               "logit_bias")  # refused when set, rather than silently ignored


class APIError(Exception):
    """An error the client gets as OpenAI error JSON."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.status}}


@dataclass
class Call:
    """What one API request asks of `vlm`."""

    tensors: dict[str, np.ndarray]
    model: str
    stream: bool
    include_usage: bool
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats: usage on every chunk


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(f"the request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    return body


def chat_call(body: dict) -> Call:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list", param="messages")
    # the server parses the messages (roles, text, image_url and video_url parts, the fetch guard for URLs)
    # and the video sampling (vLLM's `mm_processor_kwargs`: fps, max_frames)
    tensors = {"messages": _bytes([json.dumps(messages)])}
    mm_kwargs = body.get("mm_processor_kwargs")
    if mm_kwargs is not None:
        if not isinstance(mm_kwargs, dict):
            raise APIError("'mm_processor_kwargs' must be an object", param="mm_processor_kwargs")
        tensors["mm_processor_kwargs"] = _bytes([json.dumps(mm_kwargs)])
    return _call(body, tensors, max_tokens_keys=("max_completion_tokens", "max_tokens"))


def completion_call(body: dict) -> Call:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError("'prompt' must be one string (token ids and several prompts are not supported)",
                       param="prompt")
    tensors = {"text_input": _bytes([prompt]), "chat_template": np.array([False])}
    return _call(body, tensors, max_tokens_keys=("max_tokens",))


def _call(body: dict, tensors: dict[str, np.ndarray], max_tokens_keys: tuple[str, ...]) -> Call:
    for key in UNSUPPORTED:
        if body.get(key) not in (None, False, 0, [], {}) and not (key == "response_format"
                                                                  and body[key] == {"type": "text"}):
            raise APIError(f"'{key}' is not supported", param=key)
    for key in ("frequency_penalty", "presence_penalty"):
        if _number(body, key) not in (None, 0.0):
            raise APIError(f"'{key}' is not supported (only 0)", param=key)
    if _int(body, "n") not in (None, 1):
        raise APIError("only n = 1 is supported", param="n")
    stream = _bool(body, "stream") or False
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError("'stream_options' must be an object", param="stream_options")
    max_tokens = next((v for v in (_int(body, k) for k in max_tokens_keys) if v is not None), UNTIL_CONTEXT_ENDS)
    top_k = _int(body, "top_k")
    scalars = {
        "max_tokens": (max_tokens, np.int32),
        "temperature": (_number(body, "temperature"), np.float32),
        "top_p": (_number(body, "top_p"), np.float32),
        "top_k": (0 if top_k == -1 else top_k, np.int32),  # vLLM's -1: no top-k cut
        "seed": (_int(body, "seed"), np.int32),
        "min_tokens": (_int(body, "min_tokens"), np.int32),
        "ignore_eos": (_bool(body, "ignore_eos"), np.bool_),
        "stream": (stream, np.bool_),
    }
    tensors.update({name: np.array([value], dtype) for name, (value, dtype) in scalars.items() if value is not None})
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise APIError("'stop' must be a string or a list of strings", param="stop")
        if stops:
            tensors["stop"] = _bytes(stops)
    model = body.get("model")
    return Call(tensors, model if isinstance(model, str) else "", stream,
                stream and bool(_bool(options, "include_usage")),
                stream and bool(_bool(options, "continuous_usage_stats")))


def _bytes(texts: list[str]) -> np.ndarray:
    return np.array([t.encode("utf-8", "surrogatepass") for t in texts], dtype=np.object_)


def _int(body: dict, key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(f"'{key}' must be an integer", param=key)
    if not -INT32_MAX <= value <= INT32_MAX:
        raise APIError(f"'{key}' is out of range", param=key)
    return value


def _number(body: dict, key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise APIError(f"'{key}' must be a finite number", param=key)
    return float(value)


def _bool(body: dict, key: str) -> bool | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise APIError(f"'{key}' must be true or false", param=key)
    return value
