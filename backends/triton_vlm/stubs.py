"""What a python-backend stub process looks like from outside: its command line, the model it serves, its
state, and the shared-memory prefix of its server (regions we make ourselves are named after it, so that
they go wherever the server's go). Base layer: the supervisor and the relay (serving) and the E/PD shared
memory (encode) read it."""

from __future__ import annotations

import os
from pathlib import Path

UUID_CHARS = 36  # a stub's region name is its server's prefix and a uuid4


def cmdline(pid: int) -> list[str]:
    """A process's command line ([] when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process ("Z": a zombie, dead and not reaped), or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name in parentheses may hold spaces
    return fields[0], int(fields[1])


def children(parent: int) -> dict[int, str]:
    """The processes whose parent is `parent` (a server's stubs): pid -> state."""
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            s = stat(int(entry.name))
            if s is not None and s[1] == parent:
                found[int(entry.name)] = s[0]
    return found


def live_stubs(server: int, model: str) -> set[int]:
    """The live (not zombie) stub processes of `model` on the server whose pid is `server`."""
    return {pid for pid, state in children(server).items() if state != "Z" and stub_model(cmdline(pid)) == model}


def stub_model(args: list[str]) -> str | None:
    """The model a python-backend stub serves, from its command line (<repository>/<model>/<version>/model.py)."""
    if len(args) < 3 or not args[0].endswith("triton_python_backend_stub"):
        return None
    parts = Path(args[1]).parts
    return parts[-3] if len(parts) >= 3 else None


def shm_prefix() -> str:
    """The shared-memory prefix of this stub's server (its own region is the prefix + a uuid4), so that
    regions we make ourselves go wherever the server's go; "tvlm_" outside a stub."""
    own = cmdline(os.getpid())
    return own[2][:-UUID_CHARS] if stub_model(own) and len(own[2]) > UUID_CHARS else "tvlm_"
