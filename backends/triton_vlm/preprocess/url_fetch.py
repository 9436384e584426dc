"""Fetch an image or video URL without turning the server into a proxy into its own network.

http(s) only; every address a host name resolves to must be public unless
`allow_private`; the connection goes to the address that was checked (no second
DNS lookup to rebind); redirects are followed by hand and checked the same way;
a size cap and a whole-fetch deadline (name lookup, connect, TLS, headers, body).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from ..errors import InvalidRequest


@dataclass(frozen=True)
class FetchPolicy:
    timeout_s: float = 10.0
    max_bytes: int = 20 * 2**20
    allow_private: bool = False
    max_redirects: int = 3


def _checked_address(host: str, port: int, policy: FetchPolicy, watchdog: _Watchdog) -> str:
    try:
        infos = _resolve(host, port, watchdog)
    except socket.gaierror as e:
        raise InvalidRequest(f"cannot resolve URL host {host!r}: {e}") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not policy.allow_private and not ip.is_global:
            raise InvalidRequest(
                f"URL host {host!r} resolves to non-public address {ip}; "
                "fetching from local or private addresses is disabled (allow_private_urls)"
            )
    return addresses[0]


class _Watchdog:
    """The whole-fetch deadline. Socket timeouts bound each read, not the fetch: a server that drips its
    headers or body a byte at a time resets them forever. At the deadline this shuts the socket down,
    which ends whatever read or handshake is waiting on it."""

    def __init__(self, timeout_s: float) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.fired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(timeout_s, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self._fire()
        return max(left, 0.001)

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
        if self.fired:
            self._fire()

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            if self._sock is not None:
                with contextlib.suppress(OSError):  # already closed
                    self._sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


def _connect(address: str, port: int, watchdog: _Watchdog) -> socket.socket:
    sock = socket.create_connection((address, port), watchdog.remaining())
    watchdog.watch(sock)
    return sock


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str, watchdog: _Watchdog) -> None:
        super().__init__(host, port, timeout=watchdog.remaining())
        self._address, self._watchdog = address, watchdog

    def connect(self) -> None:
        self.sock = _connect(self._address, self.port, self._watchdog)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, watchdog: _Watchdog) -> None:
        super().__init__(host, port, timeout=watchdog.remaining(), context=ssl.create_default_context())
        self._address, self._watchdog = address, watchdog

    def connect(self) -> None:
        sock = _connect(self._address, self.port, self._watchdog)
        # wrapping detaches `sock`: watch the TLS socket, then shake hands under the watchdog
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host, do_handshake_on_connect=False)
        self._watchdog.watch(self.sock)
        self.sock.do_handshake()


def _resolve(host: str, port: int, watchdog: _Watchdog) -> list:
    """getaddrinfo under the deadline (it blocks in the resolver and cannot be interrupted)."""
    result: list = []
    done = threading.Event()

    def lookup() -> None:
        try:
            result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as e:
            result.append(e)
        done.set()

    threading.Thread(target=lookup, name="url-fetch-dns", daemon=True).start()
    if not done.wait(watchdog.remaining()):
        raise TimeoutError
    if isinstance(result[0], OSError):
        raise result[0]
    return result[0]


def fetch_url(url: str, policy: FetchPolicy) -> bytes:
    """The body at `url`, or InvalidRequest. Connect, TLS, headers, body and every redirect together end
    within `policy.timeout_s` of the call."""
    watchdog = _Watchdog(policy.timeout_s)
    try:
        return _fetch(url, policy, watchdog)
    except (OSError, http.client.HTTPException) as e:
        if watchdog.fired or isinstance(e, TimeoutError):  # socket timeouts are set to the deadline too
            raise InvalidRequest(f"fetching {url[:100]!r} took longer than {policy.timeout_s}s") from None
        raise InvalidRequest(f"cannot fetch URL {url[:100]!r}: {e}") from None
    finally:
        watchdog.cancel()


def _fetch(url: str, policy: FetchPolicy, watchdog: _Watchdog) -> bytes:
    for _ in range(policy.max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidRequest(f"unsupported URL {url[:100]!r}: only http(s) URLs are fetched")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = _checked_address(parts.hostname, port, policy, watchdog)
        cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        conn = cls(parts.hostname, port, address, watchdog)
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", path, headers={"User-Agent": "triton-vlm", "Accept": "image/*, video/*"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                url = urljoin(url, resp.getheader("Location"))
                continue
            if resp.status != 200:
                raise InvalidRequest(f"URL {url[:100]!r} answered HTTP {resp.status}")
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise InvalidRequest(f"the file at {url[:100]!r} is {length} bytes; the limit is {policy.max_bytes}")
            body = bytearray()
            while chunk := resp.read(65536):
                body += chunk
                if len(body) > policy.max_bytes:
                    raise InvalidRequest(f"the file at {url[:100]!r} is larger than {policy.max_bytes} bytes")
            if watchdog.fired:  # the socket was shut mid-body: what came is not the file
                raise TimeoutError
            return bytes(body)
        finally:
            conn.close()
    raise InvalidRequest(f"URL {url[:100]!r} redirected more than {policy.max_redirects} times")
