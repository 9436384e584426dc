"""Registry of model families, chosen by config.json's `model_type`; a family's module is imported only
when a checkpoint of it is loaded."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .family import Family

FAMILIES = {  # model_type -> "module:class" in this package
    "glm4v": "glm4v:Glm4v",
    "glm4v_moe": "glm4v:Glm4vMoe",
    "internvl": "internvl:InternVL",
    "qwen2_5_vl": "qwen2_5_vl:Qwen2_5_VL",
    "qwen3_vl": "qwen3_vl:Qwen3VL",
    "qwen3_vl_moe": "qwen3_vl:Qwen3VLMoe",
}


def family_class(model_type: str | None) -> type[Family]:
    if model_type not in FAMILIES:
        raise ValueError(f"model type {model_type!r} is not supported; supported families: {', '.join(FAMILIES)}")
    module, name = FAMILIES[model_type].split(":")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def load_family(model_path: str | Path) -> Family:
    model_type = json.loads((Path(model_path) / "config.json").read_text()).get("model_type")
    return family_class(model_type)(model_path)
