"""Turn one image source (raw bytes, a data: URL or an http(s) URL) into a checked RGB picture; `read_source`
reads videos' sources too."""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from ..errors import InvalidRequest
from .url_fetch import FetchPolicy, fetch_url

_DATA_URL = re.compile(rb"^data:([\w/+.-]*)(;[\w=.-]+)*;base64,", re.IGNORECASE)
_SCHEME = re.compile(rb"^[a-zA-Z][a-zA-Z0-9+.-]{1,15}://")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 2**20
    max_pixels: int = 64 * 2**20  # width * height before resizing; stops decompression bombs
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
    fetch: FetchPolicy = field(default_factory=FetchPolicy)

    @classmethod
    def of(cls, config) -> ImageLimits:
        """The limits a `config.PreprocessConfig` sets."""
        fetch = FetchPolicy(timeout_s=config.url_timeout_s, max_bytes=config.max_image_bytes,
                            allow_private=config.allow_private_urls)
        return cls(max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels, fetch=fetch)


def is_url(source: bytes) -> bool:
    """An http(s) URL, to be fetched (rather than bytes or a data: URL)."""
    head = source[:64].lstrip()[:8].lower()
    return head.startswith((b"http://", b"https://"))


def read_source(source: bytes, index: int, limits, kind: str = "image") -> bytes:
    """The file behind an image's or a video's `source` (`limits.fetch` for URLs)."""
    head = source[:64].lstrip()
    if head[:5].lower() == b"data:":
        match = _DATA_URL.match(source.strip())
        if not match:
            raise InvalidRequest(f"{kind} {index}: a data: URL must be base64 ('data:{kind}/...;base64,...')")
        if not match[1].lower().startswith(kind.encode() + b"/"):
            mime = match[1].decode("ascii", "replace") or "none"
            raise InvalidRequest(f"{kind} {index}: the data: URL's media type is {mime!r}; it must be {kind}/*")
        try:
            return base64.b64decode(source.strip()[match.end():], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"{kind} {index}: the data: URL is not valid base64") from None
    if is_url(source):
        try:
            url = source.strip().decode("ascii")
        except UnicodeDecodeError:
            raise InvalidRequest(f"{kind} {index}: the URL is not ASCII") from None
        return fetch_url(url, limits.fetch)
    if _SCHEME.match(head):
        scheme = head.split(b":", 1)[0].decode("ascii", "replace")
        raise InvalidRequest(f"{kind} {index}: URL scheme {scheme!r} is not allowed; use http(s) or data:")
    return source


def open_image(data: bytes, index: int, limits: ImageLimits) -> Image.Image:
    """Read the header of an encoded image and check its size, format and pixel count; decode nothing."""
    if not data:
        raise InvalidRequest(f"image {index} is empty")
    if len(data) > limits.max_bytes:
        raise InvalidRequest(f"image {index} is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidRequest(f"image {index} could not be decoded: not an image or corrupt") from None
    except Image.DecompressionBombError as e:  # Pillow's own check, on headers claiming over 2x its limit
        raise InvalidRequest(f"image {index} is over the limit of {limits.max_pixels} pixels: {e}") from None
    if image.format not in limits.formats:
        raise InvalidRequest(
            f"image {index} has unsupported format {image.format}; supported: {', '.join(limits.formats)}"
        )
    width, height = image.size
    if width * height > limits.max_pixels:
        raise InvalidRequest(f"image {index} is {width}x{height}; the limit is {limits.max_pixels} pixels")
    return image


def decode_image(data: bytes, index: int, limits: ImageLimits) -> Image.Image:
    """Encoded image bytes (never a URL) -> a checked RGB picture."""
    image = open_image(data, index, limits)
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidRequest(f"image {index} could not be decoded: {e}") from None
    return image.convert("RGB")


def load_image(source: bytes, index: int, limits: ImageLimits) -> Image.Image:
    """An image source (bytes, data: URL, http(s) URL) -> a checked RGB picture."""
    return decode_image(read_source(source, index, limits), index, limits)
