"""Heal dead python-backend stubs, and never outlive the server.

Triton 2.51 neither restarts a stub that died (SIGKILL, OOM killer, a crash in native code) nor stops
reporting ready: every request routed to that instance fails with "Stub process ... is not healthy"
for as long as the server runs. What it does allow, in `--model-control-mode=explicit` (our launcher's
default), is reloading the model: fresh instances take the traffic. Triton then unloads the old ones,
live stubs and all: within seconds here, or, seen once after requests had met the dead one, not until
its live sibling died too (until then they hold their memory). A reload makes fresh instances only if a
file of the model's version changed since its load (the version directory's time counts): else 2.51
keeps its instances, the dead one too, and reports success. So the supervisor touches that directory
first (a fresh repository's first `__pycache__` may do it by chance; one served before has it).

Every stub of ours runs a `StubSupervisor` thread. One of them at a time (whoever binds the server's
abstract socket name; the kernel frees it when that stub dies, and the next one takes over) watches
the server's stub processes: a stub that became a zombie (killed, not unloaded: Triton reaps the stubs
it stops) gets its model reloaded, once, and its shared-memory region unlinked (Triton never unloads
the broken instance, so nothing else would). Every supervisor also watches its own parent, on a thread
of its own (a reload in flight when the server dies never returns): a stub whose server died unlinks the
server's regions and exits, instead of running on as an orphan.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from ..stubs import cmdline, proc_stat, shm_prefix, stub_model

log = logging.getLogger(__name__)

SHM = Path("/dev/shm")
LEARN_EVERY = 5  # rounds between the scans of a stub that does not lead
PARENT_POLL_S = 0.1  # how often a stub asks whether its server still runs (one getppid)


def own_regions(prefix: str, pid: int) -> list[Path]:
    """Regions a stub made itself (`shm_outputs.py`): they die with it, so whoever sees it dead unlinks them."""
    return list(SHM.glob(f"{prefix}out{pid}_*"))


class StubSupervisor:
    def __init__(self, reload: Callable[[str], None], interval_s: float = 1.0) -> None:
        self.reload, self.interval_s = reload, interval_s
        self.server_pid = os.getppid()
        own = cmdline(os.getpid())
        self.region = own[2] if stub_model(own) else None
        self.prefix = shm_prefix()
        self.leader = False
        self._leader_socket: socket.socket | None = None
        self._stubs: dict[int, tuple[str, str, Path]] = {}  # stub pid -> (model, region, version directory)
        self._zombies: set[int] = set()  # stubs seen dead once: Triton reaps the ones it stops at once
        self._healed: set[int] = set()  # dead stubs whose model was reloaded already
        self._rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stub-supervisor", daemon=True)
        self._parent_watch = threading.Thread(target=self._watch_parent, name="stub-parent-watch", daemon=True)

    def start(self) -> StubSupervisor:
        self._thread.start()
        self._parent_watch.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._parent_watch.join(timeout=10)
        self._thread.join(timeout=10)
        if self._leader_socket is not None:
            self._leader_socket.close()  # hands the lead on

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # the supervisor must never take its stub down
                log.exception("stub supervisor check failed")

    def _watch_parent(self) -> None:
        while not self._stop.wait(PARENT_POLL_S):
            if os.getppid() != self.server_pid:
                self._orphaned()

    def check(self) -> list[str]:
        """One round: as the leader, reload the models of dead stubs. -> models reloaded."""
        self._rounds += 1
        if not self.leader and not self._try_lead():
            if self._rounds % LEARN_EVERY == 1:  # so that whoever leads next knows the model of a dead leader
                self._scan()
            return []
        reloaded = []
        for pid, (model, region, version) in self._dead_stubs().items():
            for path in [SHM / region, *own_regions(self.prefix, pid)]:
                path.unlink(missing_ok=True)
            if model in reloaded:
                continue
            log.warning("the stub of model %s (pid %d) died; reloading the model", model, pid)
            try:
                os.utime(version)  # changed since the load: Triton makes fresh instances (module docstring)
            except OSError as e:  # e.g. a read-only repository: the reload may then keep the dead instance
                log.error("cannot touch %s (%s); the reload of %s may keep its dead instance", version, e, model)
            try:
                self.reload(model)
                reloaded.append(model)
                log.warning("reloaded model %s", model)
            except Exception as e:
                log.error("reloading %s failed: %s", model, e)
        return reloaded

    def _try_lead(self) -> bool:
        """Lead if no other stub of this server does: one process at a time can bind the abstract name
        (no file to leave behind), and it is free again the moment its holder dies."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(f"\0triton-vlm-supervisor-{self.server_pid}")
        except OSError:
            sock.close()
            return False
        self._leader_socket, self.leader = sock, True
        return True

    def _scan(self) -> set[int]:
        """Learn the model and region of every live stub of this server; -> the known stubs now zombies."""
        zombies = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            stat = proc_stat(pid)
            if stat is None or stat[1] != self.server_pid:
                continue
            if stat[0] == "Z":
                if pid in self._stubs:
                    zombies.add(pid)
            elif pid not in self._stubs:
                args = cmdline(pid)
                model = stub_model(args)
                if model:
                    self._stubs[pid] = (model, args[2], Path(args[1]).parent)
        return zombies

    def _dead_stubs(self) -> dict[int, tuple[str, str, Path]]:
        """Stubs of this server that died and stayed unreaped for a whole round: pid -> (model, region, version)."""
        zombies = self._scan() - self._healed
        dead = {pid: self._stubs[pid] for pid in zombies & self._zombies}
        self._healed |= dead.keys()
        self._zombies = zombies
        return dead

    def _orphaned(self) -> None:
        """The server is gone: free its shared memory and exit now. Every region under the server's prefix
        is garbage now, its siblings' too: a stub whose python backend noticed first exits without us."""
        regions = SHM.glob(f"{self.prefix}*") if self.region else own_regions(self.prefix, os.getpid())
        for path in regions:
            path.unlink(missing_ok=True)
        os._exit(1)
