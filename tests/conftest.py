from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from triton_vlm.models import FAMILIES
from triton_vlm_clients.images import synthetic_image
from triton_vlm_clients.prometheus import server_metric, server_series  # noqa: F401 (the tests' helpers)

# The suite runs many torch processes on few cores: two workers, and each server's stubs, engines and ranks.
# OpenMP threads spin after every parallel region by default, taking a core from the others for nothing:
# the tiny engine's decode took twice the CPU with 2 threads for the same time as 1 (docs/benchmarks.md).
# Read when torch loads (none of the imports above loads it); the servers the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")
    _count_server_starts()


# test module -> tritonservers it started, and apart, those it started again (`TritonServer.wait_ready`)
_SERVER_STARTS = {"started": collections.Counter(), "started again": collections.Counter()}


def _count_server_starts() -> None:
    """Count the tritonservers the test processes start (the suite's main cost: issue 24 asks for fewer),
    and apart, those started again because they lost a port, or tritonserver crashed or hung at load; the counts are
    printed at the end of the run. Servers started by commands the tests run are not in them."""
    from triton_vlm.deploy.server import TritonServer

    start = TritonServer.start
    if getattr(start, "counted", False):
        return

    def counted(self):
        kind = "started" if self.process is None else "started again"
        _SERVER_STARTS[kind][os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[0]] += 1
        return start(self)

    counted.counted = True
    TritonServer.start = counted


# Integration modules whose servers are their own (module-scoped, or started by the command they run); every
# other one uses the session's servers (`tests/integration/conftest.py`)
OWN_SERVERS = {"test_gpu_check.py", "test_server_ports.py", "test_hung_start.py",
               *(f"test_{family}.py" for family in FAMILIES)}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """With `-n 2` (scripts/test.sh): every test that uses the session's servers runs on one worker, in order
    (some end a server), and the rest, a module at a time, on whichever worker is free. Modules go in file
    order, so the costly integration modules start early and the unit modules fill in at the end. (xdist's
    own `loadgroup` cannot group under pytest 9: it renames node ids, which pytest 9 no longer lets it do.)"""
    from xdist.scheduler import LoadScopeScheduling

    class SessionServersOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = Path(nodeid.split("::")[0])
            if path.parent == Path("tests/integration") and path.name not in OWN_SERVERS:
                return "session servers"
            return super()._split_scope(nodeid)

    config.option.loadscopereorder = False  # file order, not the largest module first
    return SessionServersOnOneWorker(config, log)


def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):  # an xdist worker: its counts go to the controller
        session.config.workeroutput["server_starts"] = {kind: dict(c) for kind, c in _SERVER_STARTS.items()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    for kind, counts in getattr(node, "workeroutput", {}).get("server_starts", {}).items():
        _SERVER_STARTS[kind].update(counts)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    titles = {"started": "tritonserver starts in the test processes",
              "started again": "and started again (a port lost, a crash or hang at load, a test's restart)"}
    for kind, counts in _SERVER_STARTS.items():
        if counts or kind == "started":
            terminalreporter.write_line(f"{titles[kind]}: {sum(counts.values())}")
        for module, count in counts.most_common():
            terminalreporter.write_line(f"  {count:3d}  {module}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random-weight Qwen2.5-VL checkpoint written by our own generator, loaded like a real one."""
    from triton_vlm.models.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


make_image = synthetic_image


def wait_until(condition, timeout_s: float = 180, what: str = "", interval_s: float = 0.2):
    """Until `condition()` is true -> that value; an assertion error after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval_s)
    return value


@contextlib.contextmanager
def redis_server(port: int | None = None):
    """A real redis-server on a free loopback port, no persistence; always stopped. -> (url, port)."""
    import redis

    from triton_vlm.deploy.server import free_port

    port = port or free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, socket_timeout=1)
        wait_until(lambda: _pings(client), 20, "redis-server")
        yield f"redis://127.0.0.1:{port}", port
    finally:
        process.terminate()
        process.wait(timeout=10)


def _pings(client) -> bool:
    try:
        return client.ping()
    except Exception:
        return False
