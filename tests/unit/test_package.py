"""The package's seams: server code never imports client code, no stage asks which family it serves, and
imports go one way, from the base layer up."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


# the package's layers, from the bottom: a module imports only from its own layer and those below
LAYERS = [{"env", "errors", "protocol", "interface", "config", "stubs", "server_pool", "__init__"}, {"models"},
          {"preprocess"}, {"encode"}, {"engine"}, {"serving"}, {"deploy", "openai_api", "cli"}]


def _layer(part: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if part in names)


def _package_imports(path: Path) -> set[str]:
    """The triton_vlm subpackages or base modules a module of the package imports (relative ones resolved)."""
    package = path.relative_to(ROOT / "backends").with_suffix("").parts[:-1]  # ("triton_vlm", "engine")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *([node.module] if node.module else [])])
            names = [module] if node.module else [f"{module}.{alias.name}" for alias in node.names]
        found |= {name.split(".")[1] for name in names if name.startswith("triton_vlm.")}
    return found


def test_imports_go_one_way_from_the_base_up():
    package = ROOT / "backends" / "triton_vlm"
    offenders = []
    for path in package.rglob("*.py"):
        own = path.relative_to(package).parts[0].removesuffix(".py")
        offenders += [f"{path.relative_to(ROOT)} -> {part}" for part in _package_imports(path)
                      if _layer(part) > _layer(own)]
    assert not offenders


def test_the_decoder_parts_name_no_family():
    """Families compose their decoders (`DecoderSpec`: their rotary embedding, attention options and each
    layer's MLP); the shared parts never branch on, or import, a family."""
    from triton_vlm.models import FAMILIES

    shared = ["layers.py", "rotary.py", "moe.py", "decoder.py", "paged_attention.py", "tp.py", "weights.py"]
    models = ROOT / "backends" / "triton_vlm" / "models"
    offenders = [(name, family) for name in shared for family in FAMILIES
                 if re.search(rf"\b{family}\b", (models / name).read_text().lower())]
    assert not offenders


def _heavy_imports(program: str, stdin: bytes = b"") -> list[str]:
    """Which of torch and transformers a fresh interpreter has imported after running `program`."""
    program += "\nimport sys; print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'torch'}))"
    found = subprocess.run([sys.executable, "-c", program], input=stdin, capture_output=True, check=True).stdout
    return ast.literal_eval(found.decode())


@pytest.mark.parametrize("model", ["encode", "language_model"])
def test_stages_that_run_no_hf_code_import_no_transformers(model):
    """Every server start imports each stub's model.py, and transformers is a third of that (issue 24: server
    starts are the suite's cost). `encode` (colocated) and `language_model` (whose engine runs in a child
    process) never need it."""
    program = ("import sys; from unittest import mock; sys.modules['triton_python_backend_utils'] = mock.MagicMock()\n"
               "import importlib.util as u\n"
               f"spec = u.spec_from_file_location('m', {str(ROOT / 'model_repository' / model / '1' / 'model.py')!r})\n"
               "spec.loader.exec_module(u.module_from_spec(spec))")
    assert _heavy_imports(program) == ["torch"]


def test_the_language_engine_process_messages_load_without_transformers():
    """The `language_model` stub unpickles what its engine process sends: the ready message and every batch
    of outputs, each with the engine's stats. When the stats' class lived in `engine/language.py`, the first
    message imported the whole engine into the stub, transformers with it (3.8 CPU-s to start, 1.5 without)."""
    from triton_vlm.engine.sequence import StepOutput
    from triton_vlm.engine.stats import EngineStats
    from triton_vlm.serving.engine_process import Geometry, _dumps

    stats = EngineStats(*range(10))
    messages = _dumps([("ready", Geometry(4096, 64, 16, 2048), stats), ("out", [(7, StepOutput([5], "a", None)),
                                                                                (8, StepOutput([], "", "stop"))],
                                                                         stats)])
    program = "import pickle, sys; assert len(pickle.loads(sys.stdin.buffer.read())) == 2"
    assert _heavy_imports(program, messages) == ["torch"]
