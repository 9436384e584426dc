"""Errors that end one request and name its problem; the server keeps serving.

On the wire a request error's message starts with its label ("invalid request: image 0 could not be
decoded"). Clients read it as they read any message; `vlm_unary`, which gets the steps' errors through
BLS (in Triton 2.51 BLS turns every error code into INTERNAL), reads the code back from it (`code_of`).
"""

from __future__ import annotations


class RequestError(Exception):
    """A problem that ends one request. `code` names its Triton error code."""

    code = "INTERNAL"
    label = "internal error"

    @property
    def wire_message(self) -> str:
        return f"{self.label}: {self}"


class InvalidRequest(RequestError):
    code = "INVALID_ARG"
    label = "invalid request"


class Unavailable(RequestError):
    code = "UNAVAILABLE"
    label = "unavailable"


def kind_of(error: Exception) -> str:
    """A metric label for the error: invalid_request, unavailable or internal_error."""
    label = error.label if isinstance(error, RequestError) else RequestError.label
    return label.replace(" ", "_")


def code_of(message: str) -> str:
    """The code of a request error from its wire message (Triton may have put words before it)."""
    for kind in (InvalidRequest, Unavailable, RequestError):
        if f"{kind.label}: " in message:
            return kind.code
    return "INTERNAL"


def strip_label(message: str) -> str:
    """A wire message without its label, and without what Triton put before it ("in ensemble 'vlm', "):
    the request error's own words, to raise again or to show."""
    for kind in (InvalidRequest, Unavailable, RequestError):
        at = message.find(f"{kind.label}: ")
        if at >= 0:
            return message[at + len(kind.label) + 2:]
    return message
