"""What a python-backend stub process looks like from outside: its command line, the model it serves, and
the shared-memory prefix of its server (regions we make ourselves are named after it, so that they go
wherever the server's go). Base layer: the supervisor (serving) and the E/PD shared memory (encode) both
read it. In a stub (or the language engine's processes), `kill -USR2 <pid>` prints its threads' Python
stacks to the server's log.
"""

from __future__ import annotations

import faulthandler
import os
import signal
from pathlib import Path

UUID_CHARS = 36  # a stub's region name is its server's prefix and a uuid4


def cmdline(pid: int) -> list[str]:
    """A process's command line ([] when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name in parentheses may hold spaces
    return fields[0], int(fields[1])


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


def our_process(args: list[str]) -> str | None:
    """What a server's process of ours runs, from its command line: a stub's model, or the module of a
    `python -m triton_vlm...` process (the language engine, a tensor-parallel rank); None for any other."""
    if model := stub_model(args):
        return model
    return args[2] if len(args) > 2 and args[1] == "-m" and args[2].startswith("triton_vlm.") else None


def dump_stacks_on_signal(signum: int = signal.SIGUSR2) -> None:
    """In a process of ours (`our_process`), `signum` prints every thread's Python stack to stderr (the
    server's log): what a process that hangs is doing, while it hangs (`TritonServer` asks for it when a
    start times out)."""
    if our_process(cmdline(os.getpid())):
        faulthandler.register(signum, all_threads=True)
