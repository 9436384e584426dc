"""The main job: build the default model if missing, start tritonserver, stream one two-image request."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from triton_vlm.deploy.repository import render
from triton_vlm.deploy.server import TritonServer
from triton_vlm.models.tiny_model import ensure_model

from .client import stream
from .images import synthetic_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="model folder (default: the tiny model, built if missing)")
    parser.add_argument("--prompt", default="Describe both pictures.")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    model = ensure_model(args.model)
    images = [synthetic_image(640, 480, seed=1), synthetic_image(800, 600, seed=2, fmt="JPEG")]
    with tempfile.TemporaryDirectory(prefix="triton-vlm-demo-") as tmp:
        repo = render(Path(tmp) / "repository", model)
        log = Path(tmp) / "tritonserver.log"
        print(f"starting tritonserver on {repo}", flush=True)
        try:
            with TritonServer(repo, log_file=log) as server:
                print(f"ready: gRPC {server.grpc_url}, HTTP {server.http_url}", flush=True)
                print(f"prompt: {args.prompt!r} with two images (640x480 PNG, 800x600 JPEG)\nanswer: ", end="")
                answer = stream(server.grpc_url, prompt=args.prompt, images=images, max_tokens=args.max_tokens,
                                on_delta=lambda text, ids: print(text, end="", flush=True))
        except Exception:
            print(f"\nfailed; the server log follows ({log}):\n{log.read_text()[-4000:] if log.exists() else ''}")
            raise
    print(f"\noutput_ids: {answer.output_ids}")
    print(f"finish_reason: {answer.finish_reason}; {answer.responses} streamed responses")
    print(f"time to first token: {answer.ttft_s * 1000:.0f} ms; total {answer.total_s * 1000:.0f} ms")
    print("server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
