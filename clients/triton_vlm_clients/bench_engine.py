"""Language-engine benchmark, in-process (no Triton): what the KV cache's design decides.

    python clients/triton_vlm_clients/bench_engine.py --model /tmp/small throughput itl capacity
    # the same measurements on another checkout's engine (e.g. before the paged KV cache):
    git worktree add /tmp/old ac24907 && PYTHONPATH=/tmp/old/backends \\
        python clients/triton_vlm_clients/bench_engine.py --model /tmp/small throughput itl capacity

- throughput: 16 text requests (64 prompt tokens, 128 output tokens each, EOS ignored), 8 decoding at
  once: output tokens per second, from the first token to the last.
- itl: 4 streams decode while three 4-image prompts (1280x720 images) arrive one after another: the
  streams' inter-token latency (p50, p99, max), with `max_num_batched_tokens` 512 (prompts prefilled in
  chunks) and 8192 (each prompt in one step). Image rows are random (the engine does not care).
- capacity: with `kv_cache_mb` 256, how many of 400 sequences of 512 prompt tokens (+32 output) run at
  once (`--capacity-seqs`: max_num_seqs), and the longest context the engine then still accepts.

Run as a file, it imports only `triton_vlm` (whichever is first on the path) and uses the engine API
both engines share: LanguageEngine(LanguageConfig(...)), submit(LanguageRequest, callback), stats().

`--engine process` runs the engine as the `language_model` stub does, in a process of its own
(`serving/engine_process.py`); `--engine both` measures the engine on its thread, then in its process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading
import time

import numpy as np
import torch

from triton_vlm.config import LanguageConfig, PreprocessConfig
from triton_vlm.engine.language import LanguageEngine, LanguageRequest
from triton_vlm.preprocess.stage import Preprocessor
from triton_vlm.protocol import GenerateRequest, SamplingParams

IN_PROCESS = True  # False: the engine in a process of its own (`--engine process`)


def engine(model: str, **knobs) -> LanguageEngine:
    known = {f.name for f in dataclasses.fields(LanguageConfig)}
    if "max_num_batched_tokens" in knobs and "max_num_batched_tokens" not in known:  # the engine before
        knobs["max_prefill_tokens"] = knobs.pop("max_num_batched_tokens")
    config = LanguageConfig(model_path=model, **{k: v for k, v in knobs.items() if k in known})
    if IN_PROCESS:
        return LanguageEngine(config)
    from triton_vlm.models import load_family
    from triton_vlm.serving.engine_process import EngineProcess

    lm = EngineProcess(config)
    lm.family = load_family(model)  # what the requests below are built from
    return lm


def text_request(lm: LanguageEngine, i: int, prompt_len: int, max_tokens: int) -> LanguageRequest:
    # text only: the tiny checkpoints' special tokens (media, EOS, vision start) are ids 780 and up
    ids = np.random.default_rng(i).integers(100, min(700, lm.family.text_config.vocab_size), prompt_len)
    return LanguageRequest(f"t{i}", ids, torch.zeros((0, lm.family.embedding_width)), np.zeros((0, 3), np.int64),
                           SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def image_request(model: str, lm: LanguageEngine, i: int) -> LanguageRequest:
    from PIL import Image

    pre = Preprocessor(PreprocessConfig(model_path=model))
    pictures = []
    for j in range(4):
        pixels = np.random.default_rng(100 * i + j).integers(0, 255, (720, 1280, 3), dtype=np.uint8)
        pictures.append(_jpeg(Image.fromarray(pixels)))
    p = pre(GenerateRequest(text_input=f"compare the pictures {i}", images=pictures,
                            sampling=SamplingParams(max_tokens=1)))
    rows = int((p.input_ids == lm.family.image_token_id).sum())
    return LanguageRequest(f"img{i}", p.input_ids, torch.randn(rows, lm.family.embedding_width) * 0.02,
                           p.image_grid_thw, SamplingParams(max_tokens=1))


def _jpeg(image) -> bytes:
    import io

    out = io.BytesIO()
    image.save(out, format="JPEG")
    return out.getvalue()


class Timeline:
    """Token arrival times per request, and its end."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.done: dict[str, threading.Event] = {}

    def submit(self, lm: LanguageEngine, request: LanguageRequest) -> None:
        times, done = self.times.setdefault(request.request_id, []), self.done.setdefault(request.request_id,
                                                                                           threading.Event())

        def on_step(out) -> None:
            now = time.perf_counter()
            times.extend([now] * len(out.token_ids))
            if out.finished:
                done.set()
        lm.submit(request, on_step)

    def wait(self, ids=None) -> None:
        for rid in ids or list(self.done):
            assert self.done[rid].wait(600), rid


def throughput(model: str) -> dict:
    lm = engine(model, max_num_seqs=8)
    try:
        t = Timeline()
        for i in range(16):
            t.submit(lm, text_request(lm, i, 64, 128))
        t.wait()
        first, last = min(v[0] for v in t.times.values()), max(v[-1] for v in t.times.values())
        tokens = sum(len(v) for v in t.times.values())
        return {"output_tokens": tokens, "output_tok_per_s": round(tokens / (last - first), 1)}
    finally:
        lm.shutdown()


def itl(model: str, budget: int) -> dict:
    lm = engine(model, max_num_seqs=8, max_num_batched_tokens=budget)
    try:
        prompts = [image_request(model, lm, i) for i in range(3)]
        t = Timeline()
        streams = [text_request(lm, 50 + i, 64, 2000) for i in range(4)]
        for r in streams:
            t.submit(lm, r)
        while min(len(t.times[r.request_id]) for r in streams) < 20:
            time.sleep(0.01)
        start = time.perf_counter()
        for r in prompts:
            t.submit(lm, r)
            t.wait([r.request_id])
        end = time.perf_counter()
        gaps = np.concatenate([np.diff([x for x in t.times[r.request_id] if start <= x <= end]) for r in streams])
        return {"prompt_tokens": [len(r.input_ids) for r in prompts], "itl_ms_p50": round(1e3 * np.median(gaps), 1),
                "itl_ms_p99": round(1e3 * np.percentile(gaps, 99), 1), "itl_ms_max": round(1e3 * gaps.max(), 1),
                "prompts_s": round(end - start, 2)}
    finally:
        lm.shutdown()


def capacity(model: str, max_num_seqs: int) -> dict:
    lm = engine(model, kv_cache_mb=256, max_num_seqs=max_num_seqs, max_num_batched_tokens=8192)
    try:
        t, peak = Timeline(), 0
        for i in range(400):
            t.submit(lm, text_request(lm, 1000 + i, 512, 32))
        while not all(e.is_set() for e in t.done.values()):
            peak = max(peak, lm.stats().running)
            time.sleep(0.02)
        stats = lm.stats()
        found = {"peak_running": peak, "max_model_len": lm.max_model_len,
                 "failed": sum(1 for v in t.times.values() if not v)}
        for name in ("blocks_total", "preemptions"):
            if hasattr(stats, name):
                found[name] = getattr(stats, name)
        return found
    finally:
        lm.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("what", nargs="+", choices=["throughput", "itl", "capacity"])
    p.add_argument("--capacity-seqs", type=int, default=1024, help="max_num_seqs of the capacity run")
    p.add_argument("--engine", choices=["thread", "process", "both"], default="thread",
                   help="the engine on a thread of this process, in a process of its own, or each in turn")
    args = p.parse_args(argv)
    import triton_vlm

    global IN_PROCESS
    result: dict = {"engine": triton_vlm.__file__}
    for where in ("thread", "process") if args.engine == "both" else (args.engine,):
        IN_PROCESS = where == "thread"
        label = f" [{where}]" if args.engine == "both" else ""
        if "throughput" in args.what:
            result[f"throughput (8 streams){label}"] = throughput(args.model)
        if "itl" in args.what:
            for budget in (512, 8192):
                result[f"itl (4 streams, 4-image prompts arrive; budget {budget}){label}"] = itl(args.model, budget)
        if "capacity" in args.what:
            result[f"capacity (kv_cache_mb 256, 512-token prompts){label}"] = capacity(args.model,
                                                                                        args.capacity_seqs)
    print(json.dumps(result, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
