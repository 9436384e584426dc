"""No request can hurt another through the real server: odd sampling values, slow image URLs and dead
stubs each end (at most) their own request, and the next good request succeeds. The tests that kill
processes do it on the session's second server (`tp2_server`, conftest.py), not on the README's."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from tests.conftest import make_image, wait_until
from tests.integration.processes import alive, children, engine, ranks, stubs
from triton_vlm.serving.supervisor import stub_model
from triton_vlm_clients.client import stream

INNOCENT = [("describe the picture", [(160, 120)]), ("hello there", []), ("what color is it", [(200, 150)]),
            ("count to ten", []), ("compare them", [(120, 90), (90, 120)]), ("why", [])]
# Values validation accepts but sampling once could not do: 1/T overflowed the logits and the engine
# thread failed every running sequence with it.
ODD = [dict(temperature=1e-45), dict(temperature=1e-45, top_p=1e-45), dict(temperature=3e38, top_k=2**30)]


def _innocent(server, i):
    prompt, sizes = INNOCENT[i]
    images = [make_image(w, h, seed=10 * i + j) for j, (w, h) in enumerate(sizes)]
    return stream(server.grpc_url, prompt=prompt, images=images, max_tokens=12)


def test_odd_sampling_values_hurt_no_concurrent_stream(server):
    solo = [_innocent(server, i).output_ids for i in range(len(INNOCENT))]
    with ThreadPoolExecutor(len(INNOCENT) + 2 * len(ODD)) as pool:
        odd = [pool.submit(stream, server.grpc_url, prompt="tell a story", max_tokens=20, **v) for v in ODD * 2]
        innocent = [pool.submit(_innocent, server, i) for i in range(len(INNOCENT))]
        assert [f.result().output_ids for f in innocent] == solo
        assert all(f.result().finish_reason in ("stop", "length") for f in odd)
    assert _innocent(server, 0).output_ids == solo[0]


class _Drip(http.server.BaseHTTPRequestHandler):
    """An image server that sends its headers a byte every 0.2 s: no single read ever times out."""

    def do_GET(self):
        for byte in b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Pad: " + b"a" * 1000:
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.2)

    def log_message(self, *args):
        pass


def test_dripping_image_urls_end_at_the_deadline_and_starve_no_one(tp2_server):
    drip = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    threading.Thread(target=drip.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{drip.server_port}/cat.png".encode()
    finished: list[str] = []

    def slow(i):
        start = time.monotonic()
        with pytest.raises(InferenceServerException, match="took longer than 10.0s"):
            stream(tp2_server.grpc_url, prompt="what is it", images=[url], max_tokens=2)
        finished.append("slow")
        return time.monotonic() - start

    def quick(i):
        stream(tp2_server.grpc_url, prompt="hi", images=[make_image(64, 64, seed=i)] if i % 2 else [], max_tokens=2)
        finished.append("quick")

    try:
        with ThreadPoolExecutor(8) as pool:
            slow_calls = [pool.submit(slow, i) for i in range(4)]  # more than the 2 preprocess instances
            time.sleep(1)
            quick_calls = [pool.submit(quick, i) for i in range(4)]
            for f in quick_calls:
                f.result()
            waited = [f.result() for f in slow_calls]
    finally:
        drip.shutdown()
    assert finished[:4] == ["quick"] * 4, "requests without URLs waited for the slow fetches"
    assert max(waited) < 30, f"a fetch outlived its 10 s deadline: {waited}"  # it dripped for 200 s before


def _anon_mb(pid: int) -> float:
    """Private memory (RssAnon): what the process holds for itself. The python backend's shared-memory
    regions (RssShmem) keep their high-water mark by design; see the README."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("RssAnon:"))
    return int(line.split()[1]) / 1024


def test_memory_goes_back_after_a_burst(tp2_server):
    images = [make_image(640, 480, seed=i) for i in range(4)]
    stream(tp2_server.grpc_url, prompt="warm up", images=images, max_tokens=4)
    [encode] = stubs(tp2_server, "encode")
    pids = {"tritonserver": tp2_server.process.pid, "encode": encode}
    before = {name: _anon_mb(pid) for name, pid in pids.items()}
    with ThreadPoolExecutor(40) as pool:  # 40 concurrent four-image streams
        answers = list(pool.map(lambda i: stream(tp2_server.grpc_url, prompt=f"describe set {i}", max_tokens=8,
                                                 images=[make_image(640, 480, seed=10 * i + j) for j in range(4)]),
                                range(40)))
    assert all(a.output_ids for a in answers)
    time.sleep(3)
    grown = {name: round(_anon_mb(pid) - before[name]) for name, pid in pids.items()}
    # glibc's defaults kept +630 MB (server) and +270 MB (encode) after such a burst, and more after each
    assert all(mb < 150 for mb in grown.values()), grown


def test_a_killed_encoder_replica_loses_no_request_and_its_model_is_reloaded(tp2_server):
    images = [make_image(160, 120, seed=1), make_image(120, 160, seed=2), make_image(200, 100, seed=3)]
    expected = stream(tp2_server.grpc_url, prompt="compare them", images=images, max_tokens=6).output_ids
    replicas = stubs(tp2_server, "vision_encoder")
    assert len(replicas) == 2
    victim = min(replicas)
    os.kill(victim, signal.SIGKILL)
    # every multi-image request needs both replicas: each shard that meets the dead one is tried again
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: stream(tp2_server.grpc_url, prompt="compare them", images=images,
                                                 max_tokens=6), range(8)))
    assert all(a.output_ids == expected for a in answers)
    wait_until(lambda: len(stubs(tp2_server, "vision_encoder") - {victim}) >= 2, what="a reloaded vision_encoder")
    assert stream(tp2_server.grpc_url, prompt="compare them", images=images, max_tokens=6).output_ids == expected


def test_a_killed_language_engine_ends_its_streams_at_once_and_a_new_one_serves(tp2_server):
    """Issue 24's defect 1: of 7 streams in flight when the language model's process was SIGKILLed, 2 never
    got an answer. Each must end with an error within seconds, and the server must serve again. The engine
    is rank 0: its other rank must exit with it, and the new engine come with a new one."""
    expected = stream(tp2_server.grpc_url, prompt="hello", max_tokens=4).output_ids
    victim, streaming = engine(tp2_server), threading.Semaphore(0)
    [rank1] = ranks(victim)

    def long_stream(i):
        first = []

        def on_delta(text, ids):
            if ids and not first:
                first.append(streaming.release())

        try:
            stream(tp2_server.grpc_url, prompt=f"tell story {i}", max_tokens=3000, ignore_eos=True,
                   on_delta=on_delta, timeout_s=120)
        except InferenceServerException as e:
            return time.monotonic(), str(e)
        return time.monotonic(), "finished"

    with ThreadPoolExecutor(7) as pool:
        streams = [pool.submit(long_stream, i) for i in range(7)]
        for _ in streams:
            assert streaming.acquire(timeout=120), "a stream never started"
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        ends = [f.result() for f in streams]
    assert all("language engine process died (signal SIGKILL)" in message for _, message in ends), ends
    assert max(at for at, _ in ends) - killed < 10, "a stream outlived its engine by more than 10 s"
    wait_until(lambda: not alive(rank1), 60, "rank 1 to exit with rank 0")
    wait_until(lambda: _engine_serves(tp2_server), what="a new language engine")
    assert engine(tp2_server) != victim and len(ranks(engine(tp2_server))) == 1
    assert stream(tp2_server.grpc_url, prompt="hello", max_tokens=4).output_ids == expected


def _engine_serves(server) -> bool:
    try:
        return bool(stream(server.grpc_url, prompt="hi", max_tokens=2, timeout_s=30).output_ids)
    except InferenceServerException:  # "restarting": not yet
        return False


def _leader(server, other_than: int | None = None) -> int:
    """The stub whose supervisor leads (it holds the server's abstract socket name), waited for: when a
    reload unloads the old instances, the leader may be one of them, and the next stub takes the lead
    within its next round."""
    def leader() -> int | None:
        inode = next((line.split()[6] for line in Path("/proc/net/unix").read_text().splitlines()[1:]
                      if line.endswith(f"@triton-vlm-supervisor-{server.process.pid}")), None)
        for pid in children(server.process.pid, "model.py") if inode else ():
            with contextlib.suppress(OSError):
                if any(os.readlink(fd) == f"socket:[{inode}]" for fd in Path(f"/proc/{pid}/fd").iterdir()):
                    return pid
        return None

    return wait_until(lambda: (pid := leader()) != other_than and pid, 30, f"a stub other than {other_than} to lead")


def test_a_killed_stage_and_the_leading_supervisor_are_reloaded(tp2_server):
    before = stream(tp2_server.grpc_url, prompt="hello", images=[make_image(64, 64)], max_tokens=4).output_ids
    [victim] = stubs(tp2_server, "encode")
    leader = _leader(tp2_server)
    leader_model = stub_model(Path(f"/proc/{leader}/cmdline").read_bytes().decode().split("\0"))
    seen = tp2_server.log_file.stat().st_size
    for pid in {victim, leader}:  # another stub must take the lead and still heal both models
        os.kill(pid, signal.SIGKILL)
    # (the leader may be a lingering stub of an old version: its model is reloaded all the same, and the
    # answers must not change)
    wait_until(lambda: {"encode", leader_model} <= _reloaded(tp2_server, seen), what="both models reloaded")
    _leader(tp2_server, other_than=leader)
    assert stream(tp2_server.grpc_url, prompt="hello", images=[make_image(64, 64)], max_tokens=4).output_ids == before


def _reloaded(server, since: int) -> set[str]:
    """Models the supervisor reloaded, from the server's log after byte `since`."""
    with open(server.log_file, "rb") as f:
        f.seek(since)
        return set(re.findall(r"reloaded model (\w+)", f.read().decode(errors="replace")))
