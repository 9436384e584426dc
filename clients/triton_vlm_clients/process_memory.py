"""Resident memory of a tritonserver and of its python-backend stubs, grouped by model (from /proc)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def _rss_kb(pid: int) -> tuple[int, int]:
    """(resident, of it private: RssAnon) in kB; 0s for a zombie."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields.get(key, "0 kB").split()[0]) for key in ("VmRSS", "RssAnon"))


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return children


def server_rss_mb(server_pid: int) -> dict[str, list[float]]:
    """{"tritonserver": [RSS MB, private MB], "<model> x<instances>": the same summed over that model's stubs}.
    RSS counts the python backend's shared memory in the server and in the stub that share it, as `ps`
    shows it; private (RssAnon) is what the process holds for itself."""
    by_model: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for pid in _children(server_pid):
        try:
            args = (Path(f"/proc/{pid}") / "cmdline").read_bytes().split(b"\0")
            if len(args) > 1 and args[0].endswith(b"triton_python_backend_stub"):
                by_model[Path(args[1].decode()).parts[-3]].append(_rss_kb(pid))
        except OSError:
            continue
    out = {"tritonserver": [kb / 1024 for kb in _rss_kb(server_pid)]}
    for model, sizes in sorted(by_model.items()):
        out[f"{model} x{len(sizes)}"] = [sum(kb) / 1024 for kb in zip(*sizes, strict=True)]
    return out
