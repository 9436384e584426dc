"""Chat messages in, a conversation for the chat template and the media sources (images, videos) out."""

from __future__ import annotations

import json
from typing import NamedTuple

from ..errors import InvalidRequest
from ..protocol import GenerateRequest

_ROLES = ("system", "user", "assistant")


class Media(NamedTuple):
    """One image or video of a request, in prompt order: its kind and its source (bytes, data: or http(s) URL)."""

    kind: str  # "image" | "video"
    source: bytes


def _url(part: dict, name: str) -> bytes:
    url = part.get(name)
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise InvalidRequest(f"a '{name}' part needs {{'{name}': {{'url': '...'}}}}")
    return url.encode()


def _parse_messages(text: str, images: list[bytes], videos: list[bytes]) -> tuple[list[dict], list[Media]]:
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"'messages' is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequest("'messages' is too deeply nested") from None
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty JSON list of chat messages")
    conversation, sources = [], []
    unused = {"image": list(images), "video": list(videos)}
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
            elif kind in ("image_url", "video_url"):
                media = kind.removesuffix("_url")
                sources.append(Media(media, _url(part, kind)))
                parts.append({"type": media})
            elif kind in ("image", "video"):  # filled from the 'images' / 'videos' tensor, in order
                if not unused[kind]:
                    raise InvalidRequest(f"message {i} has more '{kind}' parts than the '{kind}s' tensor holds")
                sources.append(Media(kind, unused[kind].pop(0)))
                parts.append({"type": kind})
            else:
                raise InvalidRequest(f"message {i}: unknown content part {str(part)[:80]!r}")
        conversation.append({"role": message["role"], "content": parts})
    for kind, left in unused.items():
        if left:
            raise InvalidRequest(f"{len(left)} {kind}(s) in '{kind}s' have no {{'type': '{kind}'}} part in 'messages'")
    return conversation, sources


def build_conversation(request: GenerateRequest) -> tuple[list[dict] | str, list[Media]]:
    """With `text_input`, the images go first in one user turn, then the videos, then the text (Qwen's habit).
    Without the chat template, the prompt is `text_input` as it is (its own placeholders, if any, take the
    images and the videos, each kind in order)."""
    media = [Media("image", x) for x in request.images] + [Media("video", x) for x in request.videos]
    if not request.chat_template:
        return request.text_input, media
    if request.messages is not None:
        return _parse_messages(request.messages, request.images, request.videos)
    parts = [{"type": m.kind} for m in media]
    parts.append({"type": "text", "text": request.text_input})
    return [{"role": "user", "content": parts}], media
