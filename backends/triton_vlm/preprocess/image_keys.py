"""Each image's content key, made by preprocess from the encoded file: a BLAKE2b digest of the file's bytes,
keyed by everything else that changes its embeddings (the model's folder, its config and image processor
files, its weight files' names, sizes and times). The embedding cache stores embeddings under it, and
the language model's prefix cache tells images of one size apart by it."""

from __future__ import annotations

import hashlib
from pathlib import Path

KEY_FILES = ("config.json", "preprocessor_config.json", "video_preprocessor_config.json")


def model_fingerprint(model_path) -> bytes:
    """What identifies the encoder's output for a given image, besides the image."""
    path = Path(model_path).resolve()
    h = hashlib.blake2b(str(path).encode(), digest_size=16)
    for name in KEY_FILES:
        file = path / name
        h.update(file.read_bytes() if file.exists() else b"-")
    for weights in sorted(path.glob("*.safetensors")):
        stat = weights.stat()
        h.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.digest()


def image_key(fingerprint: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16, key=fingerprint).hexdigest().encode()
