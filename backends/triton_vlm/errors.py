"""Errors that end one request and name its problem; the server keeps serving."""

from __future__ import annotations


class RequestError(Exception):
    """A problem with one request. `code` maps to a Triton error code by name."""

    code = "INVALID_ARG"


class InvalidRequest(RequestError):
    code = "INVALID_ARG"


class Unavailable(RequestError):
    code = "UNAVAILABLE"
