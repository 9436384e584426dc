"""Render a model repository: a copy of `model_repository/` with parameters set for one deployment."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

COMMITTED = Path(__file__).resolve().parents[2] / "model_repository"


def set_parameter(config_text: str, key: str, value: str) -> str:
    """Replace (or add) `parameters: { key: "<key>" value: { string_value: "..." } }`."""
    line = f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
    pattern = re.compile(r'^parameters:\s*\{\s*key:\s*"' + re.escape(key) + r'".*$', re.MULTILINE)
    if pattern.search(config_text):
        return pattern.sub(lambda _: line, config_text)
    return config_text.rstrip("\n") + "\n" + line + "\n"


def render(dest: str | Path, model_path: str | Path, parameters: dict[str, dict[str, str]] | None = None,
           source: Path = COMMITTED) -> Path:
    """Copy `source` to `dest`, point every model with a `model_path` parameter at `model_path`, and
    apply `parameters` ({model name: {key: value}})."""
    dest = Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__"))
    for config in dest.glob("*/config.pbtxt"):
        text = config.read_text()
        if '"model_path"' in text:
            text = set_parameter(text, "model_path", str(Path(model_path).resolve()))
        for key, value in (parameters or {}).get(config.parent.name, {}).items():
            text = set_parameter(text, key, value)
        config.write_text(text)
    return dest
