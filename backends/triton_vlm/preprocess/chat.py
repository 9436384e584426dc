"""Chat messages in, a conversation for the chat template and the image sources out."""

from __future__ import annotations

import json

from ..errors import InvalidRequest
from ..protocol import GenerateRequest

_ROLES = ("system", "user", "assistant")


def _image_url(part: dict) -> bytes:
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise InvalidRequest("an 'image_url' part needs {'image_url': {'url': '...'}}")
    return url.encode()


def _parse_messages(text: str, images: list[bytes]) -> tuple[list[dict], list[bytes]]:
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"'messages' is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequest("'messages' is too deeply nested") from None
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty JSON list of chat messages")
    conversation, sources, unused = [], [], list(images)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise InvalidRequest(f"message {i} needs a 'role' of {', '.join(_ROLES)}")
        content = message.get("content")
        if isinstance(content, str):
            conversation.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise InvalidRequest(f"message {i}: 'content' must be a string or a list of parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                sources.append(_image_url(part))
                parts.append({"type": "image"})
            elif kind == "image":  # filled from the 'images' tensor, in order
                if not unused:
                    raise InvalidRequest(f"message {i} has more 'image' parts than the 'images' tensor holds")
                sources.append(unused.pop(0))
                parts.append({"type": "image"})
            elif kind in ("video", "video_url"):
                raise InvalidRequest("video input is not supported yet")
            else:
                raise InvalidRequest(f"message {i}: unknown content part {str(part)[:80]!r}")
        conversation.append({"role": message["role"], "content": parts})
    if unused:
        raise InvalidRequest(f"{len(unused)} image(s) in 'images' have no {{'type': 'image'}} part in 'messages'")
    return conversation, sources


def build_conversation(request: GenerateRequest) -> tuple[list[dict] | str, list[bytes]]:
    """With `text_input`, the images go first in one user turn, then the text (Qwen's habit). Without the
    chat template, the prompt is `text_input` as it is (its own image placeholders, if any, take the images)."""
    if not request.chat_template:
        return request.text_input, list(request.images)
    if request.messages is not None:
        return _parse_messages(request.messages, request.images)
    parts = [{"type": "image"} for _ in request.images]
    parts.append({"type": "text", "text": request.text_input})
    return [{"role": "user", "content": parts}], list(request.images)
