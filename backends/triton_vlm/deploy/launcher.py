"""Run the real tritonserver from the nvidia-pytriton wheel with our python backend set up.

`tritonserver` (a console script of this package) is a drop-in for the real binary: it adds
LD_LIBRARY_PATH for the wheel's libraries, puts this environment's `bin` first on PATH (the
backend stub takes its Python prefix from the first python3 there), a backend directory with
the stub for this Python, a shared-memory prefix unique to the process, explicit model control (so
a model whose stub died can be reloaded), and no auto-complete of the model configs.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from .. import env

# Explicit model control, every model loaded at start: the same serving as the default mode, but a
# model whose python-backend stub died can be reloaded (our stub supervisor does it; see supervisor.py)
MODEL_CONTROL = ["--model-control-mode=explicit", "--load-model=*"]

# Our configs are complete. With auto-complete on (Triton's default), the python backend starts one more stub
# per model only to ask its model.py for a config: it imports torch and transformers and exits, a fifth of the
# CPU a server spent to start.
NO_AUTO_COMPLETE = "--disable-auto-complete-config"

# glibc malloc for the server and its stubs (they inherit it). By default, a freed large buffer raises
# the mmap threshold, so the next ones come from the heap, and per-thread arenas keep what they held:
# after a burst of 40 four-image streams the server kept 630 MB and the encode stub 270 MB more than
# before, and more after each burst. Buffers of 1 MB and up mapped on their own (returned when freed),
# two arenas, and trimming from 1 MB: both went back within 60 MB of where they started.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576", "MALLOC_ARENA_MAX": "2"}


def _pytriton() -> Path:
    import pytriton

    return Path(pytriton.__file__).parent / "tritonserver"


def binary() -> Path:
    return _pytriton() / "bin" / "tritonserver"


def backend_directory() -> Path:
    """<home>/backends/py3.X: the python backend plus the stub built for this Python."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    root = env.home() / "backends" / f"py{version}"
    stub = root / "python" / "triton_python_backend_stub"
    if not stub.exists():
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(_pytriton() / "backends", tmp)
        shutil.copy2(_pytriton() / "python_backend_stubs" / version / "triton_python_backend_stub", tmp / "python")
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    return root


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    environ = dict(os.environ if base is None else base)
    libs = [str(_pytriton().parent.parent / "nvidia_pytriton.libs")]
    # The stub links libpython3.X.so; it must be the one of the Python whose stdlib it will run
    # (a pyenv or conda Python next to the distribution's own is common), so ours goes first.
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and (Path(libdir) / str(sysconfig.get_config_var("INSTSONAME"))).exists():
        libs.insert(0, libdir)
    environ["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, *filter(None, [environ.get("LD_LIBRARY_PATH")])])
    environ["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), environ.get("PATH", "")))
    for knob, value in MALLOC.items():
        environ.setdefault(knob, value)
    return environ


def command(args: list[str]) -> list[str]:
    """The real tritonserver command line for `args` with our defaults added where not given."""
    cmd = [str(binary())]
    if not any(a.startswith("--backend-directory") for a in args):
        cmd.append(f"--backend-directory={backend_directory()}")
    if not any("shm-region-prefix-name" in a for a in args):
        # two servers on one host must not share python-backend shared memory regions
        cmd.append(f"--backend-config=python,shm-region-prefix-name=tvlm{os.getpid()}_")
    if not any(a.startswith("--model-control-mode") for a in args):
        cmd += MODEL_CONTROL
    if not any(a.startswith((NO_AUTO_COMPLETE, "--strict-model-config")) for a in args):
        cmd.append(NO_AUTO_COMPLETE)
    return cmd + args


def tritonserver_main() -> None:
    cmd = command(sys.argv[1:])
    os.execve(cmd[0], cmd, server_env())
