"""Every environment knob triton-vlm reads, in one place."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """Where built models and the backend directory live (TRITON_VLM_HOME, default ~/.cache/triton-vlm)."""
    return Path(os.environ.get("TRITON_VLM_HOME", Path.home() / ".cache" / "triton-vlm"))


def default_model_path() -> Path:
    """TRITON_VLM_MODEL, else the tiny model that `triton-vlm make-tiny-model` writes by default."""
    return Path(os.environ.get("TRITON_VLM_MODEL") or home() / "models" / "tiny-qwen2_5_vl")


def allow_private_urls() -> bool:
    """TRITON_VLM_ALLOW_PRIVATE_URLS=1 lets image and video URLs reach local and private addresses."""
    return os.environ.get("TRITON_VLM_ALLOW_PRIVATE_URLS", "0").lower() in ("1", "true", "yes")


def cuda_copy_trace() -> str:
    """TRITON_VLM_CUDA_COPY_TRACE=DIR: the embedding stubs record their CUDA memory copies there
    (`serving.cuda_copies`; the GPU check reads them)."""
    return os.environ.get("TRITON_VLM_CUDA_COPY_TRACE", "")
