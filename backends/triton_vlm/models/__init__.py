"""Registry of model families: one small adapter per family, chosen by `model_type`."""

from __future__ import annotations

import json
from pathlib import Path

from .qwen2_5_vl import Qwen2_5_VL

FAMILIES = {cls.model_type: cls for cls in (Qwen2_5_VL,)}


def load_family(model_path: str | Path):
    model_type = json.loads((Path(model_path) / "config.json").read_text()).get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"model type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type](model_path)
