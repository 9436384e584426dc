"""Stream one chat request from an OpenAI-compatible server (ours, vLLM, SGLang) over plain HTTP
Server-Sent Events, timing each content chunk: the benchmark's OpenAI backend (standard library only, so
the client adds as little as the gRPC one)."""

from __future__ import annotations

import base64
import functools
import http.client
import json
import time
from urllib.parse import urlsplit

from .client import Answer


def chat_messages(prompt: str, images: list[bytes]) -> list[dict]:
    """Images first, then the text, in one user turn (as `text_input` does)."""
    parts = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(i).decode()}}
             for i in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]


@functools.lru_cache
def served_model(base_url: str) -> str:
    """The first model GET /v1/models lists (servers answer 404 for a model they do not serve)."""
    url = urlsplit(base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        connection.request("GET", f"{url.path.rstrip('/')}/models")
        return json.loads(connection.getresponse().read())["data"][0]["id"]
    finally:
        connection.close()


def stream_chat(base_url: str, prompt: str, images: list[bytes], max_tokens: int, timeout_s: float = 300,
                model: str | None = None, **extra) -> Answer:
    """POST /v1/chat/completions with stream and include_usage (`model`: the served one by default). Chunks
    carry no token counts: each counts one token but the last, which gets the rest of usage.completion_tokens."""
    url = urlsplit(base_url)
    body = json.dumps({"model": model or served_model(base_url), "messages": chat_messages(prompt, images),
                       "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}, **extra})
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout_s)
    answer, start = Answer(), time.perf_counter()
    try:
        connection.request("POST", f"{url.path.rstrip('/')}/chat/completions", body,
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:300].decode(errors='replace')}")
        completion_tokens = 0
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                completion_tokens = chunk["usage"]["completion_tokens"]
                answer.num_input_tokens = chunk["usage"]["prompt_tokens"]
            for choice in chunk.get("choices", []):
                answer.responses += 1
                answer.text += choice["delta"].get("content") or ""
                answer.token_times_s.append(time.perf_counter() - start)
                answer.finish_reason = choice.get("finish_reason") or answer.finish_reason
    finally:
        connection.close()
    chunks = len(answer.token_times_s)
    answer.tokens_per_response = [1] * (chunks - 1) + [max(1, completion_tokens - chunks + 1)] if chunks else []
    answer.ttft_s = answer.token_times_s[0] if chunks else None
    answer.total_s = time.perf_counter() - start
    return answer
