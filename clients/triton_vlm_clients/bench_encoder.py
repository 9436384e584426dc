"""Encoder data-parallel benchmark: encode-stage time and TTFT for several encoder deployments, side by side.

Each deployment (`dpN` replicas x `tT` torch threads each) gets its own tritonserver, started one after
another in this one run, on the same requests. The encode stage is timed by calling the `encode` model
directly with `preprocess`'s outputs; TTFT through the `vlm` ensemble (max_tokens=1). Medians of
--repeats after one warm-up.

    python -m triton_vlm_clients.bench_encoder --configs dp1t1,dp2t1,dp1t2 --images 1,4,8 \
        --resolutions 448x448,1280x720
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from triton_vlm.deploy.deployment import Deployment
from triton_vlm.deploy.server import TritonServer

from . import stages
from .client import stream
from .images import synthetic_image

MODELS = Path.home() / ".cache" / "triton-vlm" / "models"
SMALL_MODEL = MODELS / "small-qwen2_5_vl"


@dataclass(frozen=True)
class Config:
    name: str
    dp: int
    threads: int

    @classmethod
    def parse(cls, text: str) -> Config:
        m = re.fullmatch(r"dp(\d+)t(\d+)", text)
        if not m:
            raise argparse.ArgumentTypeError(f"config {text!r}: expected dpNtT, e.g. dp2t1")
        return cls(text, int(m.group(1)), int(m.group(2)))


def _resolution(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def measure(server: TritonServer, media: dict, repeats: int) -> dict[str, float]:
    """`media`: the request's `images` (and `videos`, `mm_processor_kwargs`)."""
    prompt = "Describe the pictures."
    pre = stages.preprocess(server.grpc_url, prompt, **media)
    rows, _ = stages.encode(server.grpc_url, pre)  # warm-up; a row per image token
    encode_s = [stages.encode(server.grpc_url, pre)[1] for _ in range(repeats)]
    stream(server.grpc_url, prompt=prompt, max_tokens=1, **media)  # warm-up
    ttft_s = [stream(server.grpc_url, prompt=prompt, max_tokens=1, **media).ttft_s for _ in range(repeats)]
    return {"encode_ms": statistics.median(encode_s) * 1000, "ttft_ms": statistics.median(ttft_s) * 1000,
            "image_tokens": int(rows.shape[0])}


def image_workloads(image_counts: list[int], resolutions: list[tuple[int, int]]) -> dict[tuple, dict]:
    """(resolution, count) -> the request's media: `count` JPEGs of that size."""
    return {(f"{w}x{h}", n): {"images": [synthetic_image(w, h, seed=i, fmt="JPEG") for i in range(n)]}
            for (w, h) in resolutions for n in image_counts}


def run(model: Path, configs: list[Config], workloads: dict[tuple, dict], repeats: int) -> list[dict]:
    """`workloads`: (resolution, what the media column says) -> the request's media."""
    rows = {key: {"resolution": key[0], "images": key[1]} for key in workloads}
    for config in configs:
        with tempfile.TemporaryDirectory(prefix="triton-vlm-bench-") as tmp:
            repo = Deployment(model, embedding_cache_mb=0,
                              encoder_dp=config.dp, encoder_threads=config.threads).render(Path(tmp) / "repo")
            print(f"[{config.name}] starting tritonserver", file=sys.stderr, flush=True)
            with TritonServer(repo, log_file=Path(tmp) / "tritonserver.log") as server:
                for key, media in workloads.items():
                    result = measure(server, media, repeats)
                    rows[key]["image_tokens"] = result.pop("image_tokens")
                    rows[key].update({f"{config.name}_{k}": v for k, v in result.items()})
                    print(f"[{config.name}] {key[0]} x{key[1]}: {result}", file=sys.stderr, flush=True)
    return list(rows.values())


def table(rows: list[dict], configs: list[Config], metric: str, ratios: list[tuple[str, str]]) -> str:
    head = ["resolution", "images", "image tokens", *(f"{c.name} {metric} ms" for c in configs),
            *(f"{a}/{b}" for a, b in ratios)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["resolution"], str(r["images"]), str(r["image_tokens"]),
                 *(f"{r[f'{c.name}_{metric}_ms']:.0f}" for c in configs),
                 *(f"{r[f'{a}_{metric}_ms'] / r[f'{b}_{metric}_ms']:.2f}x" for a, b in ratios)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def small_model(model: Path | None, family: str) -> Path:
    """`model`, or the `small` random model of `family` (built if missing)."""
    if model is not None:
        return model
    model = MODELS / f"small-{family}"
    if not (model / "config.json").exists():
        from triton_vlm.models.tiny_model import make_tiny_model

        print(f"building the small model in {model}", file=sys.stderr)
        make_tiny_model(model, size="small", family=family)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path,
                        help="model folder (default: the `small` random model of --family, built if missing)")
    parser.add_argument("--family", default="qwen2_5_vl", help="of the default model (default: %(default)s)")
    parser.add_argument("--configs", default="dp1t1,dp2t1,dp1t2",
                        type=lambda s: [Config.parse(c) for c in s.split(",")])
    parser.add_argument("--images", default="1,4,8", type=lambda s: [int(n) for n in s.split(",")])
    parser.add_argument("--resolutions", default="448x448,1280x720",
                        type=lambda s: [_resolution(r) for r in s.split(",")])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ratios", default="dp1t1/dp2t1,dp1t2/dp2t1",
                        type=lambda s: [tuple(r.split("/")) for r in s.split(",")],
                        help="A/B columns: time of A over time of B, i.e. how many times faster B is")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    args.model = small_model(args.model, args.family)
    start = time.perf_counter()
    rows = run(args.model, args.configs, image_workloads(args.images, args.resolutions), args.repeats)
    names = {c.name for c in args.configs}
    ratios = [r for r in args.ratios if set(r) <= names]
    print(f"encode stage (median of {args.repeats}); A/B = time of A over time of B\n")
    print(table(rows, args.configs, "encode", ratios))
    print(f"\nTTFT through `vlm` (max_tokens=1, median of {args.repeats})\n")
    print(table(rows, args.configs, "ttft", ratios))
    print(f"\n({time.perf_counter() - start:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
