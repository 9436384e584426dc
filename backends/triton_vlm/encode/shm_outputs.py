"""E/PD between servers on one host: encoder servers write the embeddings straight into system shared
memory that the language server registered with them, instead of sending them in the gRPC response.

One region per (thread, encoder server): a thread runs one shard at a time, so its region is free
whenever it asks. A region grows (re-created and re-registered) when a shard needs more. Regions
are POSIX shared memory (`multiprocessing.shared_memory`, the `/name` key Triton opens); they are
unlinked when the encoder fails or on `close`. Their names start with the server's python-backend prefix,
so that if this process dies they go with the server's own regions (`supervisor.py`, `TritonServer.stop`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from multiprocessing import shared_memory

import numpy as np

from ..stubs import shm_prefix

_MIN_BYTES = 1 << 20
_ids = itertools.count()


class ShmOutputs:
    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self.prefix = shm_prefix()  # the server's: a server killed outright gets these cleaned up with its own
        self._all: dict[str, tuple[shared_memory.SharedMemory, object]] = {}  # region name -> (memory, client)

    def region(self, client, url: str, nbytes: int) -> str:
        """The name of this thread's region on `url` (registered there), at least `nbytes` long."""
        regions = self._local.__dict__.setdefault("regions", {})
        name = regions.get(url)
        if name is not None and self._all[name][0].size >= nbytes:
            return name
        if name is not None:
            self._drop(name, unregister=True)
        size = max(_MIN_BYTES, 1 << (nbytes - 1).bit_length())
        name = f"{self.prefix}out{os.getpid()}_{next(_ids)}"
        memory = shared_memory.SharedMemory(name=name, create=True, size=size)
        with self._lock:
            self._all[name] = (memory, client)
        client.register_system_shared_memory(name, f"/{name}", size)
        regions[url] = name
        return name

    def read(self, name: str, shape, dtype=np.float32) -> np.ndarray:
        """A copy of the output written into `name` (the region is reused by the next shard)."""
        return np.ndarray(shape, dtype, buffer=self._all[name][0].buf).copy()

    def forget(self, url: str) -> None:
        """The encoder failed: drop this thread's region for it (it may be gone; no unregistering)."""
        name = self._local.__dict__.get("regions", {}).pop(url, None)
        if name is not None:
            self._drop(name, unregister=False)

    def close(self) -> None:
        for name in list(self._all):
            self._drop(name, unregister=True)

    def _drop(self, name: str, unregister: bool) -> None:
        with self._lock:
            memory, client = self._all.pop(name)
        if unregister:  # the server may be gone; the region is ours to unlink either way
            with contextlib.suppress(Exception):
                client.unregister_system_shared_memory(name)
        memory.close()
        memory.unlink()
