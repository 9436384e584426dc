"""The OpenAI front end's read deadlines, on a real uvicorn server with a tiny app: a client that drips its
request head or its body is disconnected in time; a prompt one is answered, twice on one connection."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time

import pytest
import uvicorn

from triton_vlm.deploy.server import free_port
from triton_vlm.openai_api.deadlines import with_deadlines


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def port():
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           http=with_deadlines(0.5, 1.0)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(10)


def dripped_until_closed(port: int, first: bytes, drip: bytes, limit_s: float = 10) -> float:
    """Send `first`, then `drip` one byte every 0.1 s -> seconds until the server closed the connection."""
    with contextlib.closing(socket.create_connection(("127.0.0.1", port))) as sock:
        sock.settimeout(0.1)
        start = time.monotonic()
        sock.sendall(first)
        for byte in drip:
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1024) == b"":
                    return time.monotonic() - start
            except TimeoutError:
                continue
            except OSError:
                return time.monotonic() - start
            assert time.monotonic() - start < limit_s, "the connection stayed open"
        raise AssertionError("the drip ended first")


def test_a_dripped_head_is_cut_off_at_its_deadline(port):
    took = dripped_until_closed(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n", b"X-Slow: " + b"a" * 200)
    assert 0.4 < took < 3


def test_a_dripped_body_is_cut_off_at_its_deadline(port):
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 300\r\n\r\n"
    took = dripped_until_closed(port, head, b"b" * 300)
    assert 0.9 < took < 4


def test_prompt_requests_are_answered_on_a_kept_connection(port):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    for body in (b"first", b"second"):
        connection.request("POST", "/echo", body)
        response = connection.getresponse()
        assert response.status == 200 and response.read() == body
        time.sleep(0.7)  # longer than the head deadline, between requests: only keep-alive applies
    connection.close()
