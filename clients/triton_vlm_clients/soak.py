"""Soak: mixed traffic against one server for a long time, watching its memory and its failures.

    python -m triton_vlm_clients.soak --minutes 30 --clients 4 --output-json soak.json

Starts a server (`triton-vlm serve` options after `--serve`, default: the committed deployment) and
keeps `--clients` streams busy with a mix: text only, 1-4 images, streams cancelled after their first
tokens, and bad requests (a corrupt image, a bad temperature, too many images) that must be refused.
Every `--sample-s` it records the resident memory of the server and of each model's stubs. Prints a
table per `--window-min`: RSS per process, good requests failed (0 expected), bad requests wrongly
accepted (0 expected), and p99 TTFT.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from .client import build_inputs, cancel, stream
from .images import synthetic_image
from .process_memory import server_rss_mb

KINDS = (("text", 0.25), ("images", 0.55), ("cancel", 0.1), ("bad", 0.1))
BAD = ({"images": [b"\x89PNG not really"]}, {"temperature": -1.0}, {"images": [b"x"] * 9})


class Soak:
    def __init__(self, url: str, server_pid: int, seed: int = 0) -> None:
        self.url, self.server_pid = url, server_pid
        self.rng = random.Random(seed)
        self.images = [synthetic_image(w, h, seed=i) for i, (w, h) in enumerate(
            [(640, 480), (448, 448), (320, 240), (800, 600), (200, 500), (1280, 720)])]
        self.lock = threading.Lock()
        self.events: list[dict] = []  # one per request: time, kind, ok, ttft, error
        self.samples: list[dict] = []  # time, rss per process

    def request(self, start: float) -> None:
        with self.lock:
            kind = self.rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
            images = self.rng.sample(self.images, self.rng.randint(1, 4)) if kind in ("images", "cancel") else []
            bad = self.rng.choice(BAD)
            tokens = self.rng.randint(8, 32)
        event = {"t": time.monotonic() - start, "kind": kind, "ok": True, "ttft": None, "error": None}
        try:
            if kind == "bad":
                try:
                    stream(self.url, prompt="describe", max_tokens=4, **bad)
                    event.update(ok=False, error="a bad request was accepted")
                except Exception:
                    pass
            elif kind == "cancel":
                self._cancelled(images)
            else:
                answer = stream(self.url, prompt="Describe the pictures.", images=images, max_tokens=tokens)
                event["ttft"] = answer.ttft_s
        except Exception as e:
            event.update(ok=False, error=str(e)[:200])
        with self.lock:
            self.events.append(event)

    def _cancelled(self, images: list[bytes]) -> None:
        """A stream the client drops after its second response; the server must stop generating for it."""
        got = threading.Semaphore(0)
        client = grpcclient.InferenceServerClient(self.url)
        client.start_stream(callback=lambda result, error: got.release())
        request_id = uuid.uuid4().hex
        client.async_stream_infer("vlm", build_inputs(grpcclient, prompt="go on", images=images, max_tokens=500,
                                                       stream=True), request_id=request_id)
        for _ in range(2):
            if not got.acquire(timeout=120):
                raise TimeoutError("no response before the cancel")
        client.stop_stream(cancel_requests=True)
        client.close()
        cancel(self.url, request_id)  # Triton 2.51 passes no stream cancel to the running language model

    def sample(self, start: float) -> None:
        self.samples.append({"t": time.monotonic() - start, "rss_mb": server_rss_mb(self.server_pid)})

    def run(self, minutes: float, clients: int, sample_s: float) -> None:
        start = time.monotonic()
        end = start + minutes * 60
        self.sample(start)

        def client() -> None:
            while time.monotonic() < end:
                self.request(start)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for t in threads:
            t.start()
        while time.monotonic() < end:
            time.sleep(min(sample_s, max(0.0, end - time.monotonic())))
            self.sample(start)
        for t in threads:
            t.join(timeout=600)
        time.sleep(5)  # idle: what the processes keep after the traffic
        self.sample(start)

    def report(self, window_min: float) -> dict:
        windows = defaultdict(list)
        for e in self.events:
            windows[int(e["t"] // (window_min * 60))].append(e)
        rows = []
        for w in sorted(windows):
            events = windows[w]
            ttfts = [e["ttft"] for e in events if e["ttft"] is not None]
            rows.append({"window": f"{w * window_min:g}-{(w + 1) * window_min:g} min", "requests": len(events),
                         "good_failed": sum(not e["ok"] and e["kind"] != "bad" for e in events),
                         "bad_accepted": sum(not e["ok"] and e["kind"] == "bad" for e in events),
                         "p99_ttft_ms": round(1000 * float(np.percentile(ttfts, 99)), 1) if ttfts else None})
        marks = [s for s in self.samples if abs(s["t"] / (window_min * 60) - round(s["t"] / (window_min * 60))) < 0.05
                 or s is self.samples[-1]]
        errors = sorted({e["error"] for e in self.events if e["error"]})
        return {"windows": rows, "rss_marks": marks, "samples": self.samples, "errors": errors}


def print_report(report: dict) -> None:
    marks = report["rss_marks"]
    names = sorted({n for s in marks for n in s["rss_mb"]})
    print("RSS MB (private MB) per process; the rest of RSS is the python backend's shared memory")
    print("| process | " + " | ".join(f"{s['t'] / 60:.1f} min" for s in marks) + " |")
    print("|---|" + "---|" * len(marks))
    for n in names:
        cells = (s["rss_mb"].get(n, [0, 0]) for s in marks)
        print(f"| {n} | " + " | ".join(f"{rss:.0f} ({anon:.0f})" for rss, anon in cells) + " |")
    print()
    print("| window | requests | good failed | bad accepted | p99 TTFT (ms) |\n|---|---|---|---|---|")
    for r in report["windows"]:
        print(f"| {r['window']} | {r['requests']} | {r['good_failed']} | {r['bad_accepted']} | {r['p99_ttft_ms']} |")
    for e in report["errors"]:
        print(f"error: {e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m triton_vlm_clients.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--clients", type=int, default=4, help="concurrent client streams")
    p.add_argument("--sample-s", type=float, default=60, help="seconds between memory samples")
    p.add_argument("--window-min", type=float, default=10, help="minutes per row of the report")
    p.add_argument("--serve", default="", help="`triton-vlm serve` options of the server to start")
    p.add_argument("--output-json")
    args = p.parse_args(argv)

    from triton_vlm.cli import server_from_args

    with tempfile.TemporaryDirectory(prefix="triton-vlm-soak-") as tmp, \
            server_from_args(shlex.split(args.serve), Path(tmp)) as s:
        soak = Soak(s.grpc_url, s.process.pid)
        soak.run(args.minutes, args.clients, args.sample_s)
    report = soak.report(args.window_min)
    print_report(report)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=1))
    return 1 if any(r["good_failed"] or r["bad_accepted"] for r in report["windows"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
