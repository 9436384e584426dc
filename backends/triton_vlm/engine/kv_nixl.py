"""`kv_transport nixl`: a prompt's KV written by the prefill server straight into the decode server's
memory with NIXL (NVIDIA's transfer library, as Dynamo, vLLM's NixlConnector and SGLang use it): its UCX
backend moves registered CPU memory here, and the same calls move GPU memory.

The decode server registers a pool of memory once, as large as its KV cache. For each prompt (`inbox`) it
takes a region of the KV's size and sends, inside its gRPC request, a target: its agent's name, the
region's descriptors, a notification tag and, the first time it asks that prefill server, its agent's
metadata (NIXL's connection details and the pool's registration; loaded there once). The prefill server
(`write`) registers its packed KV, WRITEs it into the target with the tag as the notification, waits for
the transfer to complete, and answers over gRPC with the KV's header alone. The decode server waits for
the notification, copies the bytes out, and gives the region back. While the pool has no room, a prompt's
KV comes inside the answer instead. Nothing stays held on the prefill server
after its answer, so a decode server that dies leaves nothing behind there.

One agent per process; its calls are serialised (its notification map is shared Python state). NIXL's own
progress thread is off: its Python API fixes the thread's delay at 0, so it spun a core on every server even
when idle. Progress is ours instead: every wait here progresses the agent, and while a region waits for its
KV a thread of the decode server's progresses it every 0.5 ms (a transport without one-sided writes, such as
TCP, needs the target to progress), idle otherwise.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import threading
import time
import uuid

import torch

log = logging.getLogger(__name__)


class NixlTransport:
    def __init__(self, receive_bytes: int = 0) -> None:
        """Start this process's NIXL agent, or fail now with a clear error (never at request time). A decode
        server registers `receive_bytes` of memory once for the KV written to it (NIXL's metadata carries
        the registrations, so it is sent once); a prefill server registers what it sends, each time."""
        self.name = f"triton-vlm-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            from nixl_cu12._api import nixl_agent, nixl_agent_config

            self.agent = nixl_agent(self.name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
            self.pool = torch.empty(receive_bytes, dtype=torch.uint8)
            self._pool_registration = self.agent.register_memory(self.pool) if receive_bytes else None
        except Exception as e:
            raise RuntimeError(f"kv_transport nixl: NIXL could not start its UCX agent ({type(e).__name__}: {e}); "
                               "install nixl-cu12 or serve with kv_transport grpc") from e
        self._lock = threading.Lock()
        self._free = [(0, receive_bytes)] if receive_bytes else []  # (offset, size) of the pool's free extents
        self._peers: set[str] = set()  # agents whose metadata this one has loaded
        self._waiting = threading.Condition()  # _open: regions waiting for their KV
        self._open = 0
        if receive_bytes:
            threading.Thread(target=self._progress, name="nixl-progress", daemon=True).start()

    def _progress(self, interval_s: float = 0.0005) -> None:
        """While any region waits for its KV, progress the agent (its notifications stay in its map)."""
        while True:
            with self._waiting:
                self._waiting.wait_for(lambda: self._open > 0)
            with self._lock:
                self.agent.update_notifs()
            time.sleep(interval_s)

    def _count_open(self, delta: int) -> None:
        with self._waiting:
            self._open += delta
            self._waiting.notify()

    @property
    def metadata(self) -> str:
        with self._lock:
            return base64.b64encode(self.agent.get_agent_metadata()).decode()

    # --- decode side ---------------------------------------------------------
    def inbox(self, nbytes: int, with_metadata: bool) -> Inbox | None:
        """A region of the pool for one prompt's KV; None while the pool has no room (send it inside the answer)."""
        with self._lock:
            for i, (offset, size) in enumerate(self._free):
                if size >= nbytes:
                    self._free[i] = (offset + nbytes, size - nbytes)
                    break
            else:
                return None
        return Inbox(self, offset, nbytes, with_metadata)

    def _give_back(self, offset: int, nbytes: int) -> None:
        with self._lock:
            extents = sorted([*self._free, (offset, nbytes)])
            merged = [extents[0]]
            for start, size in extents[1:]:
                last_start, last_size = merged[-1]
                if last_start + last_size == start:
                    merged[-1] = (last_start, last_size + size)
                else:
                    merged.append((start, size))
            self._free = [(start, size) for start, size in merged if size]

    # --- prefill side --------------------------------------------------------
    def write(self, raw: torch.Tensor, target: dict, timeout_s: float = 30.0) -> None:
        """WRITE `raw` (uint8) into a decode server's target (`Inbox.target`) and wait until it is done."""
        if raw.numel() != target["nbytes"]:
            raise RuntimeError(f"the KV is {raw.numel()} bytes; the decode server's buffer takes {target['nbytes']} "
                               "(another model or dtype there?)")
        peer = target["agent"]
        with self._lock:
            if target.get("metadata"):
                self.agent.add_remote_agent(base64.b64decode(target["metadata"]))
                self._peers.add(peer)
            if peer not in self._peers:
                raise RuntimeError(f"NIXL agent {peer} is unknown here (this server restarted?)")
            registered = self.agent.register_memory(raw)
            handle = self.agent.initialize_xfer("WRITE", self.agent.get_xfer_descs(raw),
                                                self.agent.deserialize_descs(base64.b64decode(target["descs"])),
                                                peer, target["tag"].encode())
            self.agent.transfer(handle)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                with self._lock:
                    state = self.agent.check_xfer_state(handle)
                if state == "DONE":
                    return
                if state != "PROC" or time.monotonic() > deadline:
                    raise RuntimeError(f"the NIXL write to {peer} ended {state if state != 'PROC' else 'late'}")
                time.sleep(0.0002)
        finally:
            with self._lock:
                self.agent.release_xfer_handle(handle)
                self.agent.deregister_memory(registered)


class Inbox:
    """A region of the decode server's registered pool that one prompt's KV is written into."""

    def __init__(self, transport: NixlTransport, offset: int, nbytes: int, with_metadata: bool) -> None:
        self.transport, self.offset, self.buffer = transport, offset, transport.pool[offset:offset + nbytes]
        with transport._lock:
            descs = transport.agent.get_serialized_descs(transport.agent.get_xfer_descs(self.buffer))
        self.tag = uuid.uuid4().hex
        self.target = {"agent": transport.name, "descs": base64.b64encode(descs).decode(), "tag": self.tag,
                       "nbytes": nbytes, "metadata": transport.metadata if with_metadata else None}
        transport._count_open(+1)  # progressed until closed

    def wait(self, peer: str, timeout_s: float) -> torch.Tensor:
        """The bytes (a view of the pool: copy them before `close`), once the prefill server's notification came."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.transport._lock:
                if self.transport.agent.check_remote_xfer_done(peer, self.tag.encode()):
                    return self.buffer
            if time.monotonic() > deadline:
                raise TimeoutError(f"no NIXL notification from {peer} within {timeout_s:g}s")
            time.sleep(0.0002)

    def close(self, written: bool) -> None:
        """Give the region back once its KV was `written` and taken. A region whose transfer did not end so
        (the prefill server failed or timed out) is retired: a late write must not land in another prompt's
        KV. The pool shrinks by it; when it has no room, prompts' KV comes inside the answer."""
        self.transport._count_open(-1)
        if written:
            self.transport._give_back(self.offset, self.buffer.numel())
        else:
            log.warning("a NIXL region of %d bytes is retired: its transfer did not complete", self.buffer.numel())
