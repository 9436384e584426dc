"""Image URLs: scheme checks, no local/private addresses unless allowed, size caps, timeouts."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from triton_vlm.errors import InvalidRequest
from triton_vlm.preprocess.url_fetch import FetchPolicy, fetch_url

BODY = b"\x89PNG" + b"x" * 5000


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/redirect-home":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_port}/img")
            self.end_headers()
            return
        if self.path.startswith("/drip-"):  # a byte every 0.1 s: no single read ever times out
            drip = (b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\nX-Pad: " + b"a" * 400 + b"\r\n\r\n"
                    if self.path == "/drip-headers" else BODY)
            if self.path == "/drip-body":
                self.send_response(200)
                self.send_header("Content-Length", str(len(BODY)))
                self.end_headers()
            for i in range(len(drip)):
                try:
                    self.wfile.write(drip[i:i + 1])
                    self.wfile.flush()
                except OSError:
                    return
                threading.Event().wait(0.1)
            return
        if self.path == "/slow":
            self.send_response(200)
            self.end_headers()
            threading.Event().wait(3)
            return
        self.send_response(200 if self.path == "/img" else 404)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def local_http():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads, server.block_on_close = True, False  # dripping handlers must not hold up the close
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_loopback_is_refused_by_default(local_http):
    with pytest.raises(InvalidRequest, match="non-public address 127.0.0.1"):
        fetch_url(local_http + "/img", FetchPolicy())


@pytest.mark.parametrize("host", ["10.1.2.3", "192.168.0.1", "169.254.169.254", "[::1]", "0.0.0.0"])
def test_private_and_link_local_addresses_are_refused(host):
    with pytest.raises(InvalidRequest, match="non-public address"):
        fetch_url(f"http://{host}/x.png", FetchPolicy(timeout_s=0.5))


def test_allowed_by_configuration(local_http):
    assert fetch_url(local_http + "/img", FetchPolicy(allow_private=True)) == BODY


def test_size_cap(local_http):
    with pytest.raises(InvalidRequest, match="limit is 100"):
        fetch_url(local_http + "/img", FetchPolicy(allow_private=True, max_bytes=100))


def test_http_errors_and_timeouts_are_request_errors(local_http):
    with pytest.raises(InvalidRequest, match="HTTP 404"):
        fetch_url(local_http + "/missing", FetchPolicy(allow_private=True))
    with pytest.raises(InvalidRequest, match="took longer than 0.5s"):
        fetch_url(local_http + "/slow", FetchPolicy(allow_private=True, timeout_s=0.5))


def test_redirects_are_checked_too(local_http):
    assert fetch_url(local_http + "/redirect-home", FetchPolicy(allow_private=True)) == BODY
    with pytest.raises(InvalidRequest, match="redirected more than 0"):
        fetch_url(local_http + "/redirect-home", FetchPolicy(allow_private=True, max_redirects=0))


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "file:///etc/passwd", "http:///nohost"])
def test_only_http_urls(url):
    with pytest.raises(InvalidRequest, match="only http"):
        fetch_url(url, FetchPolicy())


@pytest.mark.parametrize("path", ["/drip-headers", "/drip-body"])
def test_the_deadline_bounds_the_whole_fetch_of_a_dripping_server(local_http, path):
    start = time.monotonic()
    with pytest.raises(InvalidRequest, match="took longer than 1.0s"):
        fetch_url(local_http + path, FetchPolicy(allow_private=True, timeout_s=1.0))
    assert time.monotonic() - start < 3, "the fetch outlived its deadline"  # 400+ s before the watchdog
