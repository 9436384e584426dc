"""Language-engine benchmark: the same requests as 1 stream at a time and as N concurrent streams against one
server (continuous batching), and answered by a plain transformers `generate` loop one after another.

    python -m triton_vlm_clients.bench_language --num-prompts 32 --output-len 64 --streams 8

One table (the `triton-vlm bench` metrics); ratios are against the transformers loop.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from triton_vlm.deploy.deployment import Deployment
from triton_vlm.deploy.server import TritonServer

from .bench import compare_table, report, run_server, run_transformers
from .bench_encoder import SMALL_MODEL
from .dataset import make_dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=SMALL_MODEL,
                   help="default: the `small` random model; built if missing, of --size")
    p.add_argument("--size", choices=["small", "medium"], default="small", help="size to build a missing --model at")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--image-count", type=int, default=0, help="images per request (default: text only)")
    p.add_argument("--image-resolution", default="448x448")
    p.add_argument("--streams", type=int, default=8, help="concurrent streams of the batched run")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--output-json", type=Path)
    args = p.parse_args(argv)

    if not (args.model / "config.json").exists():
        from triton_vlm.models.tiny_model import make_tiny_model

        make_tiny_model(args.model, size=args.size)
    requests = make_dataset(args.model, args.num_prompts, args.input_len, args.output_len, args.image_count,
                            resolution=args.image_resolution)
    results = {"transformers": run_transformers(args.model, requests, progress=False)}
    with tempfile.TemporaryDirectory(prefix="triton-vlm-bench-") as tmp:
        repo = Deployment(args.model, tensor_parallel=args.tp).render(Path(tmp) / "repository")
        with TritonServer(repo, log_file=Path(tmp) / "tritonserver.log") as server:
            for streams in (1, args.streams):
                results[f"{streams} stream{'s' if streams > 1 else ''}"] = run_server(
                    server.grpc_url, requests, max_concurrency=streams, progress=False)
    for name, result in results.items():
        print(report(result, name))
    print(compare_table(results))
    if args.output_json:
        args.output_json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
