"""Processes seen from /proc: which of a server's are ours (those a hung start's stacks come from), and
their state and parent (what the supervisor and a hung start read)."""

from __future__ import annotations

import os
import subprocess

from triton_vlm.stubs import our_process, proc_stat, stub_model

STUB = ["/x/backends/python/triton_python_backend_stub", "/repo/language_model/1/model.py",
        "tvlm12p3_8d6f2c1e-0000-4000-8000-000000000000", "1048576", "1048576"]


def test_stubs_and_our_module_processes_are_ours_and_nothing_else():
    assert stub_model(STUB) == our_process(STUB) == "language_model"
    engine = ["/venv/bin/python3", "-m", "triton_vlm.serving.engine_process", "--fd", "5", "--parent", "7"]
    assert our_process(engine) == "triton_vlm.serving.engine_process"
    assert our_process(["/venv/bin/python3", "-m", "triton_vlm.engine.tp_worker", "--rank", "1"]) == \
        "triton_vlm.engine.tp_worker"
    for other in ([], ["/usr/bin/redis-server", "--port", "1"], ["/venv/bin/python3", "-m", "pytest", "tests"],
                  ["/venv/bin/python3", "-c", "import triton_vlm"], ["tritonserver", "--model-repository=/r"]):
        assert our_process(other) is None


def test_proc_stat_reads_state_and_parent_and_none_when_gone():
    assert proc_stat(os.getpid()) == ("R", os.getppid())  # running: it is reading its own stat
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert proc_stat(gone.pid) is None
