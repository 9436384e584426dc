"""Render a model repository: a copy of `model_repository/` with parameters set for one deployment."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

COMMITTED = Path(__file__).resolve().parents[3] / "model_repository"


def set_parameter(config_text: str, key: str, value: str) -> str:
    """Replace (or add) `parameters: { key: "<key>" value: { string_value: "..." } }`."""
    line = f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
    pattern = re.compile(r'^parameters:\s*\{\s*key:\s*"' + re.escape(key) + r'".*$', re.MULTILINE)
    if pattern.search(config_text):
        return pattern.sub(lambda _: line, config_text)
    return config_text.rstrip("\n") + "\n" + line + "\n"


def set_instance_group(config_text: str, groups: list[dict]) -> str:
    """Replace the one-line `instance_group [ ... ]` with `groups` ([{"count": 2, "kind": "KIND_CPU"}, ...])."""
    def group(g: dict) -> str:
        gpus = f" gpus: [ {', '.join(map(str, g['gpus']))} ]" if g.get("gpus") else ""
        return f"{{ count: {g['count']} kind: {g['kind']}{gpus} }}"

    line = f"instance_group [ {', '.join(group(g) for g in groups)} ]"
    text, n = re.subn(r"^instance_group\s*\[.*\]\s*$", lambda _: line, config_text, flags=re.MULTILINE)
    if n != 1:
        raise ValueError("expected exactly one single-line instance_group")
    return text


def render(dest: str | Path, model_path: str | Path, parameters: dict[str, dict[str, str]] | None = None,
           source: Path = COMMITTED, instance_groups: dict[str, list[dict]] | None = None) -> Path:
    """Copy `source` to `dest`, point every model with a `model_path` parameter at `model_path`, and
    apply `parameters` ({model name: {key: value}}) and `instance_groups` ({model name: groups})."""
    dest = Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__"))
    for config in dest.glob("*/config.pbtxt"):
        text = config.read_text()
        if '"model_path"' in text:
            text = set_parameter(text, "model_path", str(Path(model_path).resolve()))
        for key, value in (parameters or {}).get(config.parent.name, {}).items():
            text = set_parameter(text, key, value)
        if config.parent.name in (instance_groups or {}):
            text = set_instance_group(text, instance_groups[config.parent.name])
        config.write_text(text)
    return dest
