"""E/P/D's KV transfer cost: for each transport, one prefill and one decode server (`triton-vlm serve`
options after `--serve` go to both); prompts of `--image-count` images sent one at a time; from the decode
server's metrics, the KV bytes per prompt token and the transfer rate (bytes / `triton_vlm_kv_transfer_seconds`:
from the prefill server packing the KV to the decode server having it), beside a plain memcpy of the
same bytes on this machine (the limit of a one-host transfer).

    python -m triton_vlm_clients.bench_kv --model /tmp/small --prompts 8 --image-count 4 --image-resolution 1280x720
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from triton_vlm.cli import server_from_args

from .client import stream
from .dataset import make_image
from .prometheus import server_metric

TEXT = "Describe every picture in detail, then compare them: colours, shapes, what is where. " * 4


def measure(model: str, transport: str, serve: list[str], prompts: int, n_images: int, resolution, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="triton-vlm-bench-kv-") as tmp, contextlib.ExitStack() as stack:
        def start(role: str, argv: list[str]):
            server = server_from_args([*argv, *serve, "--model", model, "--kv-transport", transport], Path(tmp) / role,
                                      graceful_stop=False)
            return stack.enter_context(server)

        prefill = start("prefill", ["--mode", "prefill"])
        decode = start("decode", ["--mode", "decode", "--prefill-urls", prefill.grpc_url])
        label = f'transport="{transport}"'
        stream(decode.grpc_url, prompt="warm-up", max_tokens=2)
        before = [server_metric(decode, n, label) for n in ("triton_vlm_kv_transfer_bytes_total",
                                                              "triton_vlm_kv_transfer_seconds_sum")]
        tokens = 0
        for _ in range(prompts):
            images = [make_image(*resolution, rng) for _ in range(n_images)]
            tokens += stream(decode.grpc_url, prompt=TEXT, images=images, max_tokens=2).num_input_tokens
        nbytes = server_metric(decode, "triton_vlm_kv_transfer_bytes_total", label) - before[0]
        seconds = server_metric(decode, "triton_vlm_kv_transfer_seconds_sum", label) - before[1]
    return {"bytes_per_token": nbytes / tokens, "mb_per_prompt": nbytes / prompts / 2**20,
            "transfer_ms_per_prompt": seconds / prompts * 1000, "mb_per_s": nbytes / seconds / 2**20,
            "memcpy_mb_per_s": memcpy_rate(int(nbytes / prompts))}


def memcpy_rate(nbytes: int, repeats: int = 20) -> float:
    """MB/s of copying `nbytes` from one buffer to another (torch's copy, this machine's threads)."""
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    return nbytes * repeats / (time.perf_counter() - start) / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_kv", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--image-count", type=int, default=4)
    p.add_argument("--image-resolution", default="1280x720")
    p.add_argument("--transports", nargs="+", default=["grpc", "nixl"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve", default="--gpus none --encoder-dp 1", help="more `triton-vlm serve` options")
    args = p.parse_args(argv)
    resolution = tuple(int(v) for v in args.image_resolution.split("x"))
    rows = {t: measure(args.model, t, shlex.split(args.serve), args.prompts, args.image_count, resolution, args.seed)
            for t in args.transports}
    print("| transport | KV bytes / prompt token | MB / prompt | transfer ms / prompt | MB/s | memcpy MB/s | "
          "MB/s / memcpy |\n| --- | --- | --- | --- | --- | --- | --- |")
    for t, r in rows.items():
        print(f"| {t} | {r['bytes_per_token']:.0f} | {r['mb_per_prompt']:.2f} | {r['transfer_ms_per_prompt']:.1f} | "
              f"{r['mb_per_s']:.0f} | {r['memcpy_mb_per_s']:.0f} | {r['mb_per_s'] / r['memcpy_mb_per_s']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
