"""Read only the tensors a process needs from a safetensors checkpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open


def _files(model_path: Path) -> list[Path]:
    index = model_path / "model.safetensors.index.json"
    if index.exists():
        return sorted({model_path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_path}")
    return files


Take = Callable[[str, Any], torch.Tensor]  # (new name, safetensors slice) -> the part to keep


def load_renamed(model_path: str | Path, rename: dict[str, str], take: Take | None = None) -> dict[str, torch.Tensor]:
    """Tensors whose name starts with a key of `rename`, with that prefix replaced by its value.

    The longest matching prefix wins, so {"model.": "", "model.visual.": None} is expressible:
    a value of None skips those tensors. `take` reads only part of a tensor (a tensor-parallel shard).
    """
    prefixes = sorted(rename, key=len, reverse=True)
    out: dict[str, torch.Tensor] = {}
    for file in _files(Path(model_path)):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                prefix = next((p for p in prefixes if name.startswith(p)), None)
                if prefix is None or rename[prefix] is None:
                    continue
                new = rename[prefix] + name[len(prefix):]
                out[new] = take(new, f.get_slice(name)) if take else f.get_tensor(name)
    return out
