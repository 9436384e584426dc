"""`scripts/gpu-check.sh --dry-run`: the GPU check's every step on CPU, as it runs on a lent GPU machine
(docs/gpu.md), so that its logic is tested where no GPU is: the `gpu` tests are collected and skipped
cleanly, the GPU deployment's greedy ids equal the CPU one's, the benchmark and encoder DP steps report
their figures, and nothing it started is left running."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_dry_run_passes_every_step_on_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path))
    done = subprocess.run([str(ROOT / "scripts" / "gpu-check.sh"), "--dry-run", "--budget-s", "900"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=960)
    summary = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    steps = summary["steps"]
    assert done.returncode == 0 and summary["ok"], _report(done, tmp_path / "out")
    assert list(steps) == ["environment", "server_parity", "gpu_tests", "bench_7b", "encoder_dp"]
    tests = steps["gpu_tests"]
    assert tests["tests"] > 0 and tests["skipped"] == tests["tests"] and not tests["failures"] + tests["errors"]
    assert steps["server_parity"]["ids_equal"] and len(steps["server_parity"]["ids"]["cpu"]) == 16
    bench = steps["bench_7b"]
    assert bench["triton-vlm 8 streams"]["successful_requests"] == 16 and bench["ratios"]
    assert steps["encoder_dp"]["dp1_ms"] > 0 and steps["encoder_dp"]["dp2_ms"] > 0
    assert (tmp_path / "out" / "steps.log").exists() and (tmp_path / "out" / "servers.log").exists()
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of the check still running: {left}"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("triton-vlm-gpu-check.")], "its venv was removed"


def _report(done: subprocess.CompletedProcess, out: Path) -> str:
    """What a failed check printed, with the ends of its step and server logs: all CI shows of a failure."""
    logs = "".join(f"\n--- {name}, ending:\n" + (out / name).read_text(errors="replace")[-4000:]
                   for name in ("steps.log", "servers.log") if (out / name).exists())
    return f"{done.stdout[-3000:]}\n{done.stderr[-2000:]}{logs}"
