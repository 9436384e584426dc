"""What `language_relay` costs: the same deployment served twice, once as shipped (`vlm` -> language_relay ->
language_model) and once with `vlm`'s last step straight to language_model (no relay: a dead stub's streams
hang), measured in turns on the same requests: a `triton-vlm bench` table a round, relay/direct in its last column.

    python -m triton_vlm_clients.bench_relay --num-prompts 32 --max-concurrency 8 --output-len 64 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

from triton_vlm.deploy.deployment import Deployment
from triton_vlm.deploy.server import TritonServer

from .bench import compare_table, run_server
from .bench_encoder import small_model
from .dataset import make_dataset


def without_relay(repo: Path) -> Path:
    """The rendered repository with `vlm`'s last step straight to language_model."""
    config = repo / "vlm" / "config.pbtxt"
    config.write_text(config.read_text().replace('model_name: "language_relay"', 'model_name: "language_model"'))
    return repo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model folder (default: the `small` random Qwen2.5-VL, built if missing)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-concurrency", type=int, default=8)
    p.add_argument("--output-len", type=int, default=64, help="tokens per request (ignore_eos)")
    p.add_argument("--image-count", type=int, default=1)
    p.add_argument("--image-resolution", default="448x448")
    p.add_argument("--rounds", type=int, default=2, help="each server measured this many times, in turns")
    args = p.parse_args(argv)

    model = small_model(args.model, "qwen2_5_vl")
    requests = make_dataset(model, args.num_prompts, output_len=args.output_len, image_count=args.image_count,
                            resolution=args.image_resolution, ignore_eos=True)
    deployment = Deployment(model, minimal=True, embedding_cache_mb=0, enable_prefix_caching=False)
    with tempfile.TemporaryDirectory(prefix="triton-vlm-relay-") as tmp, contextlib.ExitStack() as stack:
        servers = {}
        for name, fix in (("direct", without_relay), ("relay", lambda repo: repo)):
            repo = fix(deployment.render(Path(tmp) / name))
            servers[name] = stack.enter_context(TritonServer(repo, extra_args=deployment.server_args(),
                                                             log_file=Path(tmp) / f"{name}.log", graceful_stop=False))
        for round_ in range(args.rounds):  # a table a round: relay/direct measured back to back
            results = {name: run_server(server.grpc_url, requests, max_concurrency=args.max_concurrency,
                                        progress=False) for name, server in servers.items()}
            print(f"round {round_ + 1}\n{compare_table(results)}\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
