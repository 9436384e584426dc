"""Read deadlines for the OpenAI front end's HTTP connections: uvicorn's h11 protocol with a deadline for
a request's head and one for its body, so that a client that drips bytes (one header byte every two
seconds held a connection for as long as it liked) cannot hold connections without bound. Between
requests uvicorn's own keep-alive timeout applies; once a request is read the deadlines stop (a slow
answer is the server's business, and the client's disconnect cancels it)."""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def with_deadlines(head_s: float, body_s: float) -> type[H11Protocol]:
    """An h11 protocol class for `uvicorn.run(http=...)` that closes a connection whose request head is not
    complete `head_s` after its first byte, or whose body is not complete `body_s` after its head."""

    class Deadlines(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _phase = ""  # what is being read under the deadline: "head" or "body"

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and self.conn.their_state is h11.IDLE:  # a request begins
                self._arm(head_s)
            super().data_received(data)
            self._follow()

        def _follow(self) -> None:
            state = self.conn.their_state
            if state is h11.SEND_BODY and self._phase != "body":
                self._arm(body_s, "body")
            elif state not in (h11.IDLE, h11.SEND_BODY):  # read whole (or the connection is ending)
                self._disarm()

        def _arm(self, seconds: float, phase: str = "head") -> None:
            self._disarm()
            self._phase = phase
            self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline, self._phase = None, ""

        def _expired(self) -> None:
            self._deadline = None
            self.logger.warning("closing a connection whose request %s was not read in time", self._phase)
            if not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Deadlines
