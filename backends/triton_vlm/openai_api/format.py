"""OpenAI response objects: whole answers, stream chunks (Server-Sent Events) and errors."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from .upstream import Delta

FINISH = {"stop": "stop", "length": "length", "cancelled": "abort"}


@dataclass
class Reply:
    """The answer to one API request, chat (`chat.completion`) or text (`text_completion`)."""

    model: str
    chat: bool
    include_usage: bool = False
    continuous_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def whole(self, deltas: list[Delta]) -> dict:
        text = "".join(d.text for d in deltas)
        choice = {"index": 0, "finish_reason": _finish(deltas[-1]), "logprobs": None,
                  **({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})}
        return {**self._head(stream=False), "choices": [choice], "usage": usage(deltas[-1])}

    def chunk(self, delta: Delta, first: bool) -> str:
        """One SSE event for one `vlm` answer: the first carries the role with the first token (clients time
        TTFT from the first chunk), the last one the finish_reason."""
        if self.chat:
            content = {"role": "assistant", "content": delta.text} if first else {"content": delta.text}
            choice = {"index": 0, "delta": content}
        else:
            choice = {"index": 0, "text": delta.text}
        choice |= {"finish_reason": _finish(delta), "logprobs": None}
        usage_now = usage(delta) if self.continuous_usage else None
        return event({**self._head(stream=True), "choices": [choice],
                      **({"usage": usage_now} if self.include_usage or self.continuous_usage else {})})

    def usage_chunk(self, last: Delta) -> str:
        return event({**self._head(stream=True), "choices": [], "usage": usage(last)})

    def _head(self, stream: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": f"{kind}.chunk" if stream and self.chat else kind,
                "created": self.created, "model": self.model}


def usage(last: Delta) -> dict:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


def _finish(delta: Delta) -> str | None:
    return FINISH.get(delta.finish_reason, delta.finish_reason) if delta.finish_reason else None
