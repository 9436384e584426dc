"""A tritonserver process we start, wait for and always stop (used by `serve`, the demo and tests)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from ..stubs import cmdline, our_process, proc_stat
from . import launcher


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n free loopback ports, all different: held open together while they are chosen. Another process
    may still take one before the server binds it; `TritonServer` then starts again on new ones."""
    sockets = []
    try:
        for _ in range(n):
            sockets.append(socket.socket())
            sockets[-1].bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


_BIND_FAILURES = ("already in use", "at the same address", "Address in use")
# tritonserver 2.51 itself aborting while the python backend loads models (seen once in ~30 loaded servers on
# a busy 2-core machine, in the server process, not a stub): a start that dies of it is tried again
_LOAD_CRASHES = ("boost::interprocess::lock_exception",)


def is_ready(http_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wait_ready(process: subprocess.Popen, http_url: str, timeout_s: float = 300) -> None:
    """Until /v2/health/ready answers 200 from `process` (or a process it started): RuntimeError if it exits,
    TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    port = int(http_url.rsplit(":", 1)[1])
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tritonserver exited with {process.returncode}")
        if is_ready(http_url) and listens_on(process.pid, port):
            return
        time.sleep(0.5)
    raise TimeoutError(f"tritonserver not ready after {timeout_s}s")


def listens_on(pid: int, port: int) -> bool:
    """Whether `pid` or a process it started holds the socket listening on TCP `port`. tritonserver binds its
    HTTP port only once its models are loaded: until then another server that took the port we chose answers
    there, as if it were ours. True where /proc cannot tell."""
    inodes, readable = set(), False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for fields in map(str.split, rows):
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    if not readable:
        return True
    for member in descendants(pid):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in Path(f"/proc/{member}/fd").iterdir()):
                return True
    return False


def descendants(pid: int) -> list[int]:
    """pid and every process under it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))):
            children.setdefault(stat[1], []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def stop_process(process: subprocess.Popen | None, timeout_s: float = 10) -> None:
    """SIGTERM one process, SIGKILL if it lingers."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def stop_process_group(process: subprocess.Popen | None, timeout_s: float = 60, graceful: bool = True) -> None:
    """SIGTERM the whole process group (server and its stubs), SIGKILL if it lingers; SIGKILL at once
    unless `graceful`."""
    if process is None or process.poll() is not None:
        return
    try:
        if graceful:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
                return
            except subprocess.TimeoutExpired:
                pass
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


class TritonServer:
    def __init__(self, repository: str | Path, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, log_file: str | Path | None = None,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                 graceful_stop: bool = True, executable: str | None = None) -> None:
        self.repository = Path(repository)
        self.auto_ports = not (http_port or grpc_port or metrics_port)
        chosen = free_ports(3)
        self.http_port, self.grpc_port, self.metrics_port = http_port or chosen[0], grpc_port or chosen[1], \
            metrics_port or chosen[2]
        self.log_file = Path(log_file) if log_file else None
        self.extra_args = extra_args or []
        self.env = env
        self.graceful_stop = graceful_stop  # False: stop kills at once (tests, benchmarks: nothing to finish)
        self.executable = executable  # e.g. the `tritonserver` console script, run as a user would; None: the binary
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def shm_prefix(self) -> str:
        """This server's python-backend shared memory regions (/dev/shm/<prefix>*)."""
        return f"tvlm{os.getpid()}p{self.grpc_port}_"

    def start(self) -> TritonServer:
        args = [f"--model-repository={self.repository}", f"--http-port={self.http_port}",
                f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}",
                "--exit-timeout-secs=15", f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                *self.extra_args]
        out = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115 (closed in stop)
        self._log = out
        command = [self.executable, *args] if self.executable else launcher.command(args)
        env = (self.env or dict(os.environ)) if self.executable else launcher.server_env(self.env)
        self.process = subprocess.Popen(command, env=env,
                                        stdout=out, stderr=subprocess.STDOUT if out else None,
                                        start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = 300, attempts: int = 3, restart_hung: bool = False) -> TritonServer:
        """Until ready. A server on ports we chose that lost one to another process starts again on new ports;
        one that tritonserver's known load crash killed starts again. One not ready in `timeout_s` has its
        processes' state and stacks written to its log, and is stopped: with `restart_hung`, started again."""
        try:
            wait_ready(self.process, self.http_url, timeout_s)
        except TimeoutError as e:
            self._dump_stacks()
            if restart_hung and attempts > 1:
                return self._start_again(timeout_s, attempts, restart_hung)
            self.stop()
            raise TimeoutError(f"{e}; {self._log_tail()}") from None
        except RuntimeError as e:
            if attempts > 1 and (self.auto_ports and self._log_says(_BIND_FAILURES) or self._log_says(_LOAD_CRASHES)):
                return self._start_again(timeout_s, attempts, restart_hung)
            raise RuntimeError(f"{e}; {self._log_tail()}") from None
        return self

    def _start_again(self, timeout_s: float, attempts: int, restart_hung: bool) -> TritonServer:
        """Stop, and start again (on new ports where we chose them) with one attempt less."""
        self.stop()
        if self.auto_ports:
            self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        return self.start().wait_ready(timeout_s, attempts - 1, restart_hung)

    def _dump_stacks(self) -> None:
        """Into the log, for a server that hangs: each stub's (and language engine process's) state and kernel
        wait, and its threads' Python stacks (`stubs.dump_stacks_on_signal`)."""
        ours = [(pid, what) for pid in descendants(self.process.pid)[1:] if (what := our_process(cmdline(pid)))]
        if self._log is not None:
            for pid, what in ours:
                stat = proc_stat(pid)
                with contextlib.suppress(OSError):
                    wchan = Path(f"/proc/{pid}/wchan").read_text()
                    self._log.write(f"triton-vlm: process {pid} ({what}): state {stat and stat[0]}, waits in {wchan}\n"
                                    .encode())
            self._log.flush()
        for pid, _ in ours:  # one at a time: their stacks would interleave in the log
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGUSR2)
            time.sleep(0.2)
        time.sleep(1 if ours else 0)

    def _log_tail(self) -> str:
        """Where the server's log is, its errors and how it ended (its tables left out): what the error of a
        failed start needs to be understood where only the error is seen (CI)."""
        if self.log_file is None or not self.log_file.exists():
            return "no log file"
        lines = [line[:300] for line in self.log_file.read_text(errors="replace").splitlines()
                 if line.strip() and not line.startswith(("|", "+"))]
        errors = [line for line in lines if re.match(r"E\d{4} ", line)][-5:]
        return "\n".join([f"log: {self.log_file}; its errors:", *errors, "its end:", *lines[-8:]])

    def _log_says(self, failures: tuple[str, ...]) -> bool:
        if self.log_file is None or not self.log_file.exists():
            return False
        text = self.log_file.read_text(errors="replace")
        return any(failure in text for failure in failures)

    def terminate(self) -> None:
        """SIGTERM the server's process group and return at once: safe in a signal handler, which must not
        wait on the process (the interrupted `wait` holds Popen's lock, so a second one never returns)."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)

    def stop(self, timeout_s: float = 60, graceful: bool | None = None) -> None:
        """SIGTERM (Triton finishes in-flight requests and finalizes every model, several seconds), or with
        `graceful` False SIGKILL to the whole process group; either way its shared memory goes too."""
        graceful = self.graceful_stop if graceful is None else graceful
        stop_process_group(self.process, timeout_s, graceful)
        if self.process is not None:  # a killed server leaves its regions behind; a clean stop, none
            for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
                region.unlink(missing_ok=True)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __enter__(self) -> TritonServer:
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
