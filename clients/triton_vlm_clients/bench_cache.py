"""Embedding and prefix cache benchmark: TTFT of a repeated request (cache hit) against its first send
(miss), a multi-turn chat that resends the earlier images each turn (both caches on; the prefix cache
off; the embedding cache off), and the key's cost per MB.

    python -m triton_vlm_clients.bench_cache --model /tmp/small --rounds 5 --turns 4 --images-per-turn 2

Starts one server per setting (`triton-vlm serve` options after `--serve`), measures, stops it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from triton_vlm.cli import server_from_args

from .client import stream
from .dataset import make_image


def _images(rng, n: int, resolution: tuple[int, int]) -> list[bytes]:
    return [make_image(*resolution, rng) for _ in range(n)]


def _ttft(url: str, images: list[bytes], prompt: str = "Describe the pictures.") -> float:
    return stream(url, prompt=prompt, images=images, max_tokens=1).ttft_s * 1000


def hit_vs_miss(url: str, rounds: int, n_images: int, resolution, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    _ttft(url, _images(rng, n_images, resolution))  # warm-up
    miss, hit = [], []
    for _ in range(rounds):
        images = _images(rng, n_images, resolution)
        miss.append(_ttft(url, images))
        hit.append(_ttft(url, images))
    return {"miss_ttft_ms": statistics.mean(miss), "hit_ttft_ms": statistics.mean(hit),
            "hit/miss": statistics.mean(hit) / statistics.mean(miss)}


def multi_turn(url: str, conversations: int, turns: int, per_turn: int, resolution, seed: int) -> list[float]:
    """Mean TTFT per turn; turn t sends all 1..t turns' images (as a chat resends them)."""
    rng = np.random.default_rng(seed)
    _ttft(url, _images(rng, 1, resolution))  # warm-up
    per_turn_ms: list[list[float]] = [[] for _ in range(turns)]
    for _ in range(conversations):
        images: list[bytes] = []
        for t in range(turns):
            images += _images(rng, per_turn, resolution)
            per_turn_ms[t].append(_ttft(url, list(images), prompt=f"turn {t}: what changed?"))
    return [statistics.mean(v) for v in per_turn_ms]


def hash_cost_ms_per_mb(size_mb: int = 32) -> float:
    data, key = os.urandom(size_mb * 2**20), hashlib.blake2b(b"model").digest()
    start = time.perf_counter()
    hashlib.blake2b(data, digest_size=16, key=key).hexdigest()
    return (time.perf_counter() - start) * 1000 / size_mb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--serve", default="--gpus none --minimal", help="`triton-vlm serve` options")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--resolution", default="1280x720")
    p.add_argument("--conversations", type=int, default=3)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--images-per-turn", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", nargs="+", default=["cache", "no prefix cache", "no embedding cache"],
                   choices=["cache", "no prefix cache", "no embedding cache"], help="deployments to measure")
    p.add_argument("--output-json")
    args = p.parse_args(argv)
    resolution = tuple(int(x) for x in args.resolution.split("x"))
    result: dict = {"hash_ms_per_mb": hash_cost_ms_per_mb()}
    settings = {"cache": [], "no prefix cache": ["--no-enable-prefix-caching"],
                "no embedding cache": ["--embedding-cache-mb", "0"]}
    for name in args.settings:
        cache = settings[name]
        with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp, \
                server_from_args([*shlex.split(args.serve), *cache, "--model", args.model], Path(tmp),
                                 graceful_stop=False) as server:
            if name == "cache":
                result["repeat"] = hit_vs_miss(server.grpc_url, args.rounds, args.images, resolution, args.seed)
            result[f"multi_turn_ttft_ms ({name})"] = multi_turn(
                server.grpc_url, args.conversations, args.turns, args.images_per_turn, resolution, args.seed + 1)
    print(json.dumps(result, indent=1))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
