"""The processes of a server under test: its stubs, its language engine and the engine's ranks."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

from triton_vlm.deploy.server import TritonServer


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def children(parent: int, command: str) -> set[int]:
    """Live children of `parent` whose command line holds `command`."""
    out = subprocess.run(["pgrep", "-P", str(parent), "-f", command], capture_output=True, text=True).stdout.split()
    return {int(p) for p in out if alive(int(p))}


def descendants(pid: int) -> set[int]:
    """Every live process under `pid`."""
    below = children(pid, ".")
    return below.union(*map(descendants, below))


def stubs(server: TritonServer, model: str) -> set[int]:
    """Live stub processes of `model` on `server`."""
    return children(server.process.pid, f"/{model}/1/model.py")


def engine(server: TritonServer) -> int:
    """The language engine process (rank 0): the language_model stub's child (`serving/engine_process.py`)."""
    [stub] = stubs(server, "language_model")
    [rank0] = children(stub, "triton_vlm.serving.engine_process")
    return rank0


def ranks(rank0: int) -> set[int]:
    """The engine's other tensor-parallel ranks: its children."""
    return children(rank0, "triton_vlm.engine.tp_worker")
