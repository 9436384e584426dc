"""The package's seams: server code never imports client code, and no stage asks which family it serves."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER = [*(ROOT / "backends").rglob("*.py"), *(ROOT / "model_repository").rglob("*.py")]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_server_code_never_imports_client_code():
    offenders = [str(p.relative_to(ROOT)) for p in SERVER
                 if any(m.split(".")[0] == "triton_vlm_clients" for m in _imports(p))]
    assert SERVER and not offenders


def test_no_stage_tests_the_model_type():
    models = ROOT / "backends" / "triton_vlm" / "models"
    offenders = [str(p.relative_to(ROOT)) for p in SERVER
                 if models not in p.parents and re.search(r"model_type\s*(==|!=|\bin\b)", p.read_text())]
    assert not offenders
