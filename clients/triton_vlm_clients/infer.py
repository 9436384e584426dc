"""`triton-vlm infer`: send one request with tritonclient and print the answer.

    python -m triton_vlm_clients.infer --url 127.0.0.1:8001 --image cat.jpg --prompt "What is this?" --stream
"""

from __future__ import annotations

import argparse
import sys

from .client import infer, read_image, stream


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="triton-vlm infer", description="send one request with tritonclient")
    p.add_argument("--url", default="127.0.0.1:8001", help="gRPC address (HTTP address with --protocol http)")
    p.add_argument("--image", action="append", default=[], help="file, http(s) URL or data: URL; repeatable")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stream", action="store_true", help="stream from `vlm` over gRPC")
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc", help="for the unary `vlm_unary` call")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    request = dict(prompt=args.prompt, images=[read_image(i) for i in args.image], max_tokens=args.max_tokens,
                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if args.stream:
        answer = stream(args.url, on_delta=lambda text, ids: print(text, end="", flush=True), **request)
        print()
    else:
        answer = infer(args.url, protocol=args.protocol, **request)
        print(answer.text)
    print(f"output_ids: {answer.output_ids}\nfinish_reason: {answer.finish_reason}", file=sys.stderr)
    if answer.ttft_s is not None:
        print(f"time to first token: {answer.ttft_s * 1000:.0f} ms", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
