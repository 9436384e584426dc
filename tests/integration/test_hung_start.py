"""A server whose load hangs: the start times out with an error that names its log, where each stub's state
and Python stacks are; asked to, it starts again once first; nothing of it is left running."""

from __future__ import annotations

import subprocess
import time

import pytest

from triton_vlm.deploy.server import TritonServer

CONFIG = """name: "stuck"
backend: "python"
input [{ name: "X", data_type: TYPE_FP32, dims: [1] }]
output [{ name: "Y", data_type: TYPE_FP32, dims: [1] }]
instance_group [{ kind: KIND_CPU, count: 1 }]
"""

MODEL = """import threading
from pathlib import Path

import triton_vlm  # noqa: F401 (as every model of ours: a stub that hangs can say where)


class TritonPythonModel:
    def initialize(self, args):
        Path(args["model_repository"], "..", "..", "hangs").touch()
        self.loading_forever()

    def loading_forever(self):
        threading.Event().wait()
"""


def test_a_start_that_hangs_times_out_saying_where_each_stub_waits_and_can_start_again(tmp_path):
    (tmp_path / "repository" / "stuck" / "1").mkdir(parents=True)
    (tmp_path / "repository" / "stuck" / "config.pbtxt").write_text(CONFIG)
    (tmp_path / "repository" / "stuck" / "1" / "model.py").write_text(MODEL)
    log = tmp_path / "server.log"
    server = TritonServer(tmp_path / "repository", log_file=log, graceful_stop=False).start()
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "hangs").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        first_port = server.http_port
        with pytest.raises(TimeoutError, match="not ready after 5s") as error:
            server.wait_ready(timeout_s=5, attempts=2, restart_hung=True)  # it hangs again, and is given up
        assert str(log) in str(error.value)
        text = log.read_text()
        assert text.count('loading: stuck:1') == 2 and server.http_port != first_port  # started again
        assert "(stuck): state S" in text
        assert "in loading_forever" in text and "in initialize" in text  # the stub's Python stack
    finally:
        server.stop()
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert not left, f"still running: {left}"
