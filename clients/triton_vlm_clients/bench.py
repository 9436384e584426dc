"""`triton-vlm bench`: a serving benchmark for image workloads against the `vlm` ensemble (gRPC streaming).

    triton-vlm bench --url 127.0.0.1:8001 --num-prompts 50 --image-count 4 --image-resolution 720p \
        --request-rate 2 --max-concurrency 8 --output-json out.json

Or start and measure several deployments one after another, with plain transformers beside them:

    triton-vlm bench --compare "dp1=--encoder-dp 1" "dp2=--encoder-dp 2" --transformers-baseline ...

Requests are sent at Poisson arrival times (`--request-rate`, `inf` = all at once) under a concurrency
cap; each records when it was sent and when each token-carrying response arrived (`metrics.py`).
Failed requests are counted and their errors listed, never dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from .arrivals import arrival_times
from .client import stream
from .dataset import BenchRequest, make_dataset
from .metrics import Timeline, summarize
from .openai_client import stream_chat

ROWS = [  # (key, label) of the result table, in the order users know from vLLM / SGLang
    ("successful_requests", "Successful requests"), ("failed_requests", "Failed requests"),
    ("duration_s", "Benchmark duration (s)"), ("request_throughput", "Request throughput (req/s)"),
    ("total_text_input_tokens", "Total text input tokens"), ("total_vision_input_tokens", "Total vision input tokens"),
    ("total_output_tokens", "Total generated tokens"), ("text_input_throughput", "Text input throughput (tok/s)"),
    ("vision_input_throughput", "Vision input throughput (tok/s)"), ("output_throughput", "Output throughput (tok/s)"),
    *((f"{stat}_{metric}_ms", f"{stat.capitalize()} {name} (ms)")
      for metric, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e_latency", "E2E latency"))
      for stat in ("mean", "median", "p99")),
]


def _one(url: str, request: BenchRequest, timeout_s: float) -> Timeline:
    """`url`: a gRPC address (the `vlm` ensemble), or http://.../v1 (an OpenAI-compatible server)."""
    timeline = Timeline(sent=0.0, text_tokens=request.text_tokens, image_tokens=request.image_tokens)
    fixed = {"ignore_eos": True} if request.ignore_eos else {}
    try:
        if url.startswith("http"):
            answer = stream_chat(url, request.prompt, request.images, request.max_tokens, timeout_s, **fixed)
        else:
            answer = stream(url, timeout_s=timeout_s, prompt=request.prompt, images=request.images,
                            max_tokens=request.max_tokens, **fixed)
    except Exception as e:  # counted as a failure, with its message
        timeline.error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return timeline
    timeline.token_times, timeline.tokens_per_response = answer.token_times_s, answer.tokens_per_response
    timeline.end = answer.total_s
    return timeline


def run_server(url: str, requests: list[BenchRequest], request_rate: float = float("inf"),
               max_concurrency: int | None = None, seed: int = 0, warmup: int = 1, timeout_s: float = 600,
               progress: bool = True) -> dict:
    for request in requests[:1] * warmup:
        _one(url, request, timeout_s)
    offsets = arrival_times(len(requests), request_rate, seed)
    slots = threading.Semaphore(max_concurrency or len(requests))
    bar = tqdm(total=len(requests), disable=not progress, file=sys.stderr, desc="requests")

    def task(request: BenchRequest) -> Timeline:
        try:
            return _one(url, request, timeout_s)
        finally:
            slots.release()
            bar.update(1)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_concurrency or len(requests) or 1) as pool:
        futures = []
        for request, offset in zip(requests, offsets, strict=True):
            time.sleep(max(0.0, start + offset - time.perf_counter()))
            slots.acquire()
            futures.append(pool.submit(task, request))
        timelines = [f.result() for f in futures]
    duration = time.perf_counter() - start
    bar.close()
    return summarize(timelines, duration)


def run_transformers(model: str | Path, requests: list[BenchRequest], warmup: int = 1, progress: bool = True) -> dict:
    """The same requests answered by plain transformers `generate`, one after another, in this process."""
    from .hf_baseline import HFModel

    hf = HFModel(model)
    for request in requests[:1] * warmup:
        hf.generate(request.prompt, request.images, request.max_tokens)
    timelines = []
    start = time.perf_counter()
    for request in tqdm(requests, disable=not progress, file=sys.stderr, desc="transformers"):
        sent = time.perf_counter() - start
        out = hf.generate(request.prompt, request.images, request.max_tokens)
        timelines.append(Timeline(sent=sent, token_times=[sent + t for t in out.token_times_s],
                                  tokens_per_response=[1] * len(out.token_times_s), end=sent + out.total_s,
                                  text_tokens=request.text_tokens, image_tokens=request.image_tokens))
    return summarize(timelines, time.perf_counter() - start)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def report(result: dict, title: str = "Serving Benchmark Result") -> str:
    lines = [f"{f' {title} ':=^56}"]
    lines += [f"{label:<40}{_fmt(result[key]):>16}" for key, label in ROWS]
    if result["errors"]:
        lines.append("Errors: " + "; ".join(result["errors"]))
    return "\n".join(lines + ["=" * 56])


def compare_table(results: dict[str, dict]) -> str:
    """Metrics down, configurations across, and each configuration's ratio to the first."""
    names = list(results)
    base = names[0]
    head = ["metric", *names, *(f"{n}/{base}" for n in names[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in ROWS:
        values = [results[n][key] for n in names]
        ratios = [f"{v / values[0]:.2f}x" if v is not None and values[0] else "-" for v in values[1:]]
        lines.append("| " + " | ".join([label, *map(_fmt, values), *ratios]) + " |")
    return "\n".join(lines)


def _take_count(tokens: list[str], flag: str) -> tuple[int, list[str]]:
    """(the value of `flag`, the tokens without it): "--encoder-servers 2 --encoder-dp 1" -> (2, [...])."""
    if flag not in tokens:
        return 0, tokens
    at = tokens.index(flag)
    return int(tokens[at + 1]), tokens[:at] + tokens[at + 2:]


def _run_deployment(name: str, serve_args: str, requests: list[BenchRequest], args) -> dict:
    """Start one deployment, measure it, stop it. `--encoder-servers N` (E/PD) starts N encoder servers
    (`serve --mode encoder`) that the measured server encodes on (`--mode language`); `--prefill-servers M`
    (E/P/D) starts M prefill servers (`--mode prefill`) and makes the measured server their decode server
    (`--mode decode`). The other options go to every server."""
    from triton_vlm.cli import server_from_args

    encoders, options = _take_count(shlex.split(serve_args), "--encoder-servers")
    prefills, options = _take_count(options, "--prefill-servers")
    model = ["--model", str(args.model)]
    with tempfile.TemporaryDirectory(prefix="triton-vlm-bench-") as tmp, contextlib.ExitStack() as stack:
        def start(role: str, argv: list[str]):
            return stack.enter_context(server_from_args([*argv, *model], Path(tmp) / role, graceful_stop=False))

        print(f"[{name}] starting tritonserver ({serve_args or 'defaults'})", file=sys.stderr, flush=True)
        urls = [start(f"encoder{i}", ["--mode", "encoder", *options]).grpc_url for i in range(encoders)]
        prefill_urls = [start(f"prefill{i}", ["--mode", "prefill", *options]).grpc_url for i in range(prefills)]
        mode = ["--mode", "decode" if prefill_urls else "language"] if urls or prefill_urls else []
        remote = [*(["--encoder-urls", *urls] if urls else []), *(["--prefill-urls", *prefill_urls] if prefill_urls
                                                                   else [])]
        return _run(start("server", [*options, *mode, *remote]).grpc_url, requests, args)


def _run(url: str, requests: list[BenchRequest], args) -> dict:
    return run_server(url, requests, args.request_rate, args.max_concurrency, args.seed, args.warmup,
                      progress=not args.disable_tqdm)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="triton-vlm bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="127.0.0.1:8001", help="gRPC address of a running server")
    p.add_argument("--openai-url", help="also measure this OpenAI API (http://HOST:PORT/v1) with the same "
                   "requests, after the gRPC run: one side-by-side table")
    p.add_argument("--ignore-eos", action="store_true", help="every request generates --output-len tokens "
                   "(random-weight models may otherwise end at once)")
    p.add_argument("--model", default=None, help="model folder, for token counts, --compare and the baseline "
                   "(default: $TRITON_VLM_MODEL or the tiny model)")
    p.add_argument("--num-prompts", type=int, default=20)
    p.add_argument("--input-len", type=int, default=64, help="random prompt tokens per request")
    p.add_argument("--output-len", type=int, default=32, help="max_tokens per request")
    p.add_argument("--image-count", type=int, default=1)
    p.add_argument("--random-image-count", action="store_true", help="1..--image-count images per request")
    p.add_argument("--image-resolution", default="720p", help="720p, 1080p or WxH")
    p.add_argument("--image-format", choices=["jpeg", "png"], default="jpeg")
    p.add_argument("--image-content", choices=["random", "blank"], default="random")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson; inf: all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="untimed requests first")
    p.add_argument("--compare", nargs="+", metavar="NAME=SERVE_ARGS", help="start each deployment in turn "
                   "(`triton-vlm serve` options; `--encoder-servers N` starts N encoder servers and a language server "
                   "that uses them, `--prefill-servers M` M prefill servers and a decode server that uses them) and "
                   "measure it; one side-by-side table")
    p.add_argument("--transformers-baseline", action="store_true",
                   help="also answer the requests with plain transformers generate, one at a time")
    p.add_argument("--output-json", type=Path)
    p.add_argument("--disable-tqdm", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from triton_vlm.models.tiny_model import ensure_model

    args.model = ensure_model(args.model)
    requests = make_dataset(args.model, args.num_prompts, args.input_len, args.output_len, args.image_count,
                            args.random_image_count, args.image_resolution, args.image_format, args.image_content,
                            args.seed, args.ignore_eos)
    results: dict[str, dict] = {}
    if args.compare:
        for spec in args.compare:
            name, _, serve_args = spec.partition("=")
            results[name] = _run_deployment(name, serve_args, requests, args)
    else:
        results["triton-vlm"] = _run(args.url, requests, args)
        if args.openai_url:
            results["openai-api"] = _run(args.openai_url, requests, args)
    if args.transformers_baseline:
        results["transformers"] = run_transformers(args.model, requests, args.warmup, not args.disable_tqdm)
    for name, result in results.items():
        print(report(result, f"{name}"))
    if len(results) > 1:
        print(compare_table(results))
    if args.output_json:
        args.output_json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                "results": results}, indent=1) + "\n")
    return 1 if any(r["failed_requests"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
