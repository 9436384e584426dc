"""The language engine in a process of its own (vLLM's engine-core split): the `language_model` stub keeps
every request's Triton response sender, and the engine - the model, its KV cache, its threads and CUDA
context, its tensor-parallel ranks - runs in `python -m triton_vlm.serving.engine_process`, the stub's
child. When that process dies (killed, out of memory, a crash in a kernel), every request it had ends
with an `Unavailable` error at once and a new engine starts; requests that come meanwhile get the same
error. (A decoupled stub that dies takes its requests' response senders with it: Triton 2.51 never ends
those streams. The stub that holds them now runs no model code.)

`EngineProcess` has `LanguageEngine`'s interface: `submit(request, callback)` -> a handle (`cancel()`),
`stats()`, `cached_prefix(request)`, the KV geometry, `shutdown()`. Messages go over a socket pair,
pickled: CPU tensors by value, CUDA tensors by CUDA IPC handle (torch's own reduction), so embeddings
that arrive on the GPU stay there.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import logging
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from ..config import LanguageConfig
from ..engine.sequence import Callback, LanguageRequest, StepOutput, deliver
from ..engine.tp_worker import exit_with_parent
from ..errors import Unavailable

log = logging.getLogger(__name__)


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor) and obj.is_cuda:
            from torch.multiprocessing.reductions import reduce_tensor

            return reduce_tensor(obj)
        return NotImplemented


def _dumps(message) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
    return buffer.getvalue()


@dataclass(frozen=True)
class Geometry:
    """What the adapter asks the engine about its KV cache."""

    kv_bytes_per_token: int
    num_blocks: int
    block_size: int
    max_model_len: int


_COUNTERS = ("prefill_tokens", "decode_tokens", "prefix_queries", "prefix_hits", "preemptions", "imported_tokens")


class _Handle:
    def __init__(self, engine: EngineProcess, rid: int) -> None:
        self.engine, self.rid = engine, rid

    def cancel(self) -> None:
        self.engine._send(("cancel", self.rid))


class EngineProcess:
    RESTART_DELAY_S = 1.0  # before the second try to start a new engine after one died (then twice as long)

    def __init__(self, config: LanguageConfig, start_timeout_s: float = 900) -> None:
        self.config, self.start_timeout_s = config, start_timeout_s
        self._lock = threading.Lock()  # the connection and what waits on it
        self._send_lock = threading.Lock()
        self._callbacks: dict[int, Callback] = {}
        self._replies: dict[int, queue.SimpleQueue] = {}
        self._ids = itertools.count()
        self._conn: Connection | None = None
        self._stats = None  # the engine's last `EngineStats`, as it sent them
        self._before = dict.fromkeys(_COUNTERS, 0)  # the counts of the engines that died (counters only go up)
        self._closing = False
        self.restarts = 0
        self.process, conn, self.geometry, self._stats = self._start()  # raises when the engine cannot start
        self._serve(conn)

    # --- LanguageEngine's interface -----------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        return self.geometry.kv_bytes_per_token

    @property
    def num_blocks(self) -> int:
        return self.geometry.num_blocks

    @property
    def block_size(self) -> int:
        return self.geometry.block_size

    @property
    def max_model_len(self) -> int:
        return self.geometry.max_model_len

    def submit(self, request: LanguageRequest, callback: Callback) -> _Handle | None:
        if request.image_embeds.is_cuda:  # Triton's memory cannot be shared again: the engine's own copy
            request = replace(request, image_embeds=request.image_embeds.clone())
        rid = next(self._ids)
        payload = _dumps(("submit", rid, request))
        with self._lock:
            conn = self._conn
            if conn is not None:
                self._callbacks[rid] = callback
        if conn is None:
            deliver(callback, StepOutput([], "", "error", Unavailable(
                "the language engine is restarting after its process died; retry")))
            return None
        # to the engine it was accepted for: if that one is gone, the reader has ended the request (a new
        # engine must not run it unheard)
        self._send(payload, conn)
        return _Handle(self, rid)

    def cached_prefix(self, request: LanguageRequest, timeout_s: float = 30) -> int:
        rid, reply = next(self._ids), queue.SimpleQueue()
        with self._lock:
            self._replies[rid] = reply
        self._send(("prefix", rid, request))
        try:
            return reply.get(timeout=timeout_s)
        except queue.Empty:
            return 0
        finally:
            with self._lock:
                self._replies.pop(rid, None)

    def stats(self):
        """The engine's `EngineStats`, with the counts of the engines before it."""
        with self._lock:
            now, before = self._stats, self._before
        return replace(now, **{name: getattr(now, name) + before[name] for name in _COUNTERS})

    def shutdown(self, timeout_s: float = 60) -> None:
        """The engine ends its requests (the waiting ones with an error), then exits."""
        self._closing = True
        self._send(("stop",))
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=10)
        self._fail_all(Unavailable("the language model is shutting down"))

    # --- the process --------------------------------------------------------
    def _start(self) -> tuple:
        """-> the engine's process, its connection, its `Geometry` and its first stats."""
        ours, theirs = socket.socketpair()
        python = Path(sys.prefix) / "bin" / "python3"  # the stub's sys.executable is not a Python
        process = subprocess.Popen([str(python), "-m", "triton_vlm.serving.engine_process", "--fd",
                                    str(theirs.fileno()), "--parent", str(os.getpid())], pass_fds=[theirs.fileno()])
        theirs.close()
        conn = Connection(ours.detach())
        try:
            conn.send_bytes(_dumps(self.config))
            deadline = time.monotonic() + self.start_timeout_s
            while not conn.poll(1.0):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the language engine process did not start (exit code {process.poll()})")
            kind, *value = pickle.loads(conn.recv_bytes())
            if kind == "failed":
                raise value[0]
            return process, conn, *value
        except BaseException:
            conn.close()
            process.kill()
            process.wait()
            raise

    def _serve(self, conn: Connection) -> None:
        with self._lock:
            self._conn = conn
        self._reader = threading.Thread(target=self._read, args=(conn,), name="language-engine-reader",
                                        daemon=True)
        self._reader.start()

    def _send(self, message, to: Connection | None = None) -> None:
        """To the engine now serving (or only to `to`, while it serves)."""
        payload = message if isinstance(message, bytes) else _dumps(message)
        with self._send_lock:
            conn = self._conn
            if conn is None or to not in (None, conn):
                return
            with contextlib.suppress(OSError):  # the engine died: the reader sees it and ends its requests
                conn.send_bytes(payload)

    def _read(self, conn: Connection) -> None:
        try:
            while True:
                kind, *rest = pickle.loads(conn.recv_bytes())
                if kind == "out":
                    outputs, stats = rest
                    with self._lock:
                        self._stats = stats
                    for rid, out in outputs:
                        with self._lock:
                            callback = self._callbacks.pop(rid) if out.finished else self._callbacks.get(rid)
                        if callback is not None:
                            deliver(callback, out)
                elif kind == "reply":
                    rid, value = rest
                    with self._lock:
                        reply = self._replies.get(rid)
                    if reply is not None:
                        reply.put(value)
        except (EOFError, OSError):
            pass
        with self._send_lock, self._lock:
            self._conn = None
        conn.close()
        if self._closing:
            return
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # it closed its end without exiting: it serves no one
            self.process.kill()
            code = self.process.wait()
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        log.error("triton-vlm: the language engine process died (%s); starting a new one", how)
        counted = self.stats()
        with self._lock:  # its counts carry over to the next engine's; it runs nothing now
            self._before = {name: getattr(counted, name) for name in _COUNTERS}
            self._stats = replace(counted, running=0, waiting=0, blocks_in_use=0, **dict.fromkeys(_COUNTERS, 0))
        self._fail_all(Unavailable(f"the language engine process died ({how}); this request was lost: retry it"))
        self._restart()

    def _fail_all(self, error: Unavailable) -> None:
        with self._lock:
            callbacks, self._callbacks = self._callbacks, {}
            replies = list(self._replies.values())
        for callback in callbacks.values():
            deliver(callback, StepOutput([], "", "error", error))
        for reply in replies:
            reply.put(0)

    def _restart(self) -> None:
        delay_s = self.RESTART_DELAY_S
        while not self._closing:
            try:
                self.process, conn, self.geometry, stats = self._start()
            except Exception:
                log.exception("triton-vlm: a new language engine failed to start; trying again in %.0f s", delay_s)
                time.sleep(delay_s)
                delay_s = min(2 * delay_s, 60.0)
                continue
            with self._lock:
                self._stats = stats
            self.restarts += 1
            if self._closing:  # shut down while it started: it goes too
                self.process.kill()
                conn.close()
                return
            log.warning("triton-vlm: a new language engine process serves (pid %d)", self.process.pid)
            self._serve(conn)
            return


# --- the engine's side --------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--parent", type=int, required=True)
    args = p.parse_args(argv)
    threading.Thread(target=exit_with_parent, args=(args.parent,), daemon=True).start()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s language-engine %(levelname)s %(message)s")
    conn = Connection(args.fd)
    config: LanguageConfig = pickle.loads(conn.recv_bytes())
    from ..engine.language import LanguageEngine
    from .cuda_copies import CopyTrace

    copies = CopyTrace("language_engine")  # with TRITON_VLM_CUDA_COPY_TRACE only (the GPU check)
    try:
        engine = LanguageEngine(config)
    except BaseException as e:
        log.exception("the language engine failed to start")
        conn.send_bytes(_dumps(("failed", RuntimeError(f"the language engine failed to start: {e}"))))
        return 1
    conn.send_bytes(_dumps(("ready", Geometry(engine.kv_bytes_per_token, engine.num_blocks, engine.block_size,
                                               engine.max_model_len), engine.stats())))
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    handles: dict[int, object] = {}  # the unfinished requests' engine handles (`cancel()`)
    ended: set[int] = set()  # requests that ended before their handle was stored
    handles_lock, send_lock = threading.Lock(), threading.Lock()

    def send(message) -> None:
        payload = _dumps(message)
        with send_lock:
            conn.send_bytes(payload)

    def write() -> None:  # one message per batch of outputs, with the engine's stats after them
        running = True
        while running:
            batch = [outbox.get()]
            while not outbox.empty():
                batch.append(outbox.get())
            running = None not in batch
            outputs = [item for item in batch if item is not None]
            with handles_lock:
                for rid, out in outputs:
                    if out.finished and handles.pop(rid, None) is None:
                        ended.add(rid)
            send(("out", outputs, engine.stats()))

    writer = threading.Thread(target=write, name="language-engine-writer", daemon=True)
    writer.start()
    try:
        while True:
            kind, *rest = pickle.loads(conn.recv_bytes())
            if kind == "submit":
                rid, request = rest
                handle = engine.submit(request, lambda out, rid=rid: outbox.put((rid, out)))
                with handles_lock:
                    if rid in ended:
                        ended.discard(rid)
                    else:
                        handles[rid] = handle
            elif kind == "cancel":
                with handles_lock:
                    handle = handles.get(rest[0])
                if handle is not None:
                    handle.cancel()
            elif kind == "prefix":
                rid, request = rest
                send(("reply", rid, engine.cached_prefix(request)))
            elif kind == "stop":
                break
    except (EOFError, OSError):
        os._exit(0)  # the stub is gone: no one is left to answer
    engine.shutdown()  # every request it had ends; the writer sends those ends
    outbox.put(None)
    writer.join(timeout=30)
    copies.stop()
    return 0


if __name__ == "__main__":
    from triton_vlm.serving import engine_process  # the module by its name: what it pickles must load elsewhere

    sys.exit(engine_process.main())
