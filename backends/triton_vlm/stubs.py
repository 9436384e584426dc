"""What a python-backend stub process looks like from outside: its command line, the model it serves, and
the shared-memory prefix of its server (regions we make ourselves are named after it, so that they go
wherever the server's go). Base layer: the supervisor (serving) and the E/PD shared memory (encode) both
read it. In a stub, `kill -USR2 <stub pid>` prints its threads' Python stacks to the server's log.
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


def dump_stacks_on_signal(signum: int = signal.SIGUSR2) -> None:
    """In a python-backend stub, `signum` prints every thread's Python stack to stderr (the server's log):
    what a stub that hangs is doing, while it hangs (`TritonServer` asks for it when a start times out)."""
    if stub_model(cmdline(os.getpid())):
        faulthandler.register(signum, all_threads=True)
