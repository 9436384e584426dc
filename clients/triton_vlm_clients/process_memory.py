"""Resident memory of a tritonserver and of its python-backend stubs, grouped by model (from /proc)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0  # a zombie


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


def server_rss_mb(server_pid: int) -> dict[str, float]:
    """{"tritonserver": MB, "<model> x<instances>": MB summed over that model's stubs, ...}. Shared memory
    that a stub and the server both map counts in both, as `ps` shows it."""
    by_model: dict[str, list[int]] = defaultdict(list)
    for pid in _children(server_pid):
        try:
            args = (Path(f"/proc/{pid}") / "cmdline").read_bytes().split(b"\0")
            if len(args) > 1 and args[0].endswith(b"triton_python_backend_stub"):
                by_model[Path(args[1].decode()).parts[-3]].append(_rss_kb(pid))
        except OSError:
            continue
    out = {"tritonserver": _rss_kb(server_pid) / 1024}
    for model, sizes in sorted(by_model.items()):
        out[f"{model} x{len(sizes)}"] = sum(sizes) / 1024
    return out
