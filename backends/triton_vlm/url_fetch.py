"""Fetch an image URL without turning the server into a proxy into its own network.

http(s) only; every address a host name resolves to must be public unless
`allow_private`; the connection goes to the address that was checked (no second
DNS lookup to rebind); redirects are followed by hand and checked the same way;
a size cap and a whole-fetch deadline.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from .errors import InvalidRequest


@dataclass(frozen=True)
class FetchPolicy:
    timeout_s: float = 10.0
    max_bytes: int = 20 * 2**20
    allow_private: bool = False
    max_redirects: int = 3


def _checked_address(host: str, port: int, policy: FetchPolicy) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise InvalidRequest(f"cannot resolve image URL host {host!r}: {e}") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not policy.allow_private and not ip.is_global:
            raise InvalidRequest(
                f"image URL host {host!r} resolves to non-public address {ip}; "
                "fetching from local or private addresses is disabled (allow_private_urls)"
            )
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_url(url: str, policy: FetchPolicy) -> bytes:
    deadline = time.monotonic() + policy.timeout_s
    for _ in range(policy.max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidRequest(f"unsupported image URL {url[:100]!r}: only http(s) URLs are fetched")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = _checked_address(parts.hostname, port, policy)
        cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        conn = cls(parts.hostname, port, address, timeout=policy.timeout_s)
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", path, headers={"User-Agent": "triton-vlm", "Accept": "image/*"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                url = urljoin(url, resp.getheader("Location"))
                continue
            if resp.status != 200:
                raise InvalidRequest(f"image URL {url[:100]!r} answered HTTP {resp.status}")
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise InvalidRequest(f"image at {url[:100]!r} is {length} bytes; the limit is {policy.max_bytes}")
            body = bytearray()
            while chunk := resp.read(65536):
                body += chunk
                if len(body) > policy.max_bytes:
                    raise InvalidRequest(f"image at {url[:100]!r} is larger than {policy.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise InvalidRequest(f"fetching {url[:100]!r} took longer than {policy.timeout_s}s")
            return bytes(body)
        except (OSError, http.client.HTTPException) as e:
            raise InvalidRequest(f"cannot fetch image URL {url[:100]!r}: {e}") from None
        finally:
            conn.close()
    raise InvalidRequest(f"image URL {url[:100]!r} redirected more than {policy.max_redirects} times")
