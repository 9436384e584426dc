"""Video benchmark: one long clip's encode step and TTFT with its frames on one encoder replica and on two
(side by side in one run, `bench_encoder`'s servers), and what decoding and sampling cost per second of video.

    python -m triton_vlm_clients.bench_video --frames 64 --size 640x360 --repeats 3

The clip is made with PyAV (`clips.make_clip`: MPEG-4 in MP4) at 2 fps, so that the processor's 2 fps
sampling takes every one of its frames. The decode cost is measured in-process (`Preprocessor`: probe,
decode the sampled frames, resize, patchify), for clips of 30 fps sampled at 2 fps, of each --decode-sizes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from triton_vlm.config import PreprocessConfig
from triton_vlm.preprocess.stage import Preprocessor
from triton_vlm.protocol import GenerateRequest

from .bench_encoder import Config, run, small_model, table
from .clips import make_clip


def decode_cost(model: Path, size: tuple[int, int], seconds: float, repeats: int) -> dict[str, float]:
    """Median ms to preprocess a `seconds`-long 30 fps clip (sampled at the processor's rate), and per second."""
    clip = make_clip(seconds=seconds, fps=30.0, width=size[0], height=size[1], seed=7)
    pre = Preprocessor(PreprocessConfig(model_path=model, max_video_seconds=10_000.0, max_video_tokens=2**31,
                                        max_model_len=2**31))  # the cost alone, whatever the context
    request = GenerateRequest(text_input="what happens", videos=[clip])
    pre(request)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = pre(request)
        times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1000
    return {"ms": ms, "ms_per_s": ms / seconds, "frames": int(out.image_grid_thw[0, 0]) * 2,
            "mb": len(clip) / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="default: the `small` random model of --family")
    parser.add_argument("--family", default="qwen2_5_vl")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--configs", default="dp1t1,dp2t1,dp1t2",
                        type=lambda s: [Config.parse(c) for c in s.split(",")])
    parser.add_argument("--decode-seconds", default="10,60", type=lambda s: [float(x) for x in s.split(",")])
    parser.add_argument("--decode-sizes", default="640x360,1280x720",
                        type=lambda s: [tuple(int(x) for x in r.split("x")) for r in s.split(",")])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    model = small_model(args.model, args.family)
    width, height = (int(x) for x in args.size.split("x"))
    start = time.perf_counter()
    clip = make_clip(seconds=args.frames / 2, fps=2.0, width=width, height=height, seed=64)
    rows = run(model, args.configs, {(args.size, f"{args.frames}-frame video"): {"videos": [clip]}}, args.repeats)
    names = [c.name for c in args.configs]
    ratios = [(a, "dp2t1") for a in names if a != "dp2t1"] if "dp2t1" in names else []
    print(f"encode stage (median of {args.repeats}); A/B = time of A over time of B\n")
    print(table(rows, args.configs, "encode", ratios))
    print(f"\nTTFT through `vlm` (max_tokens=1, median of {args.repeats})\n")
    print(table(rows, args.configs, "ttft", ratios))
    print(f"\ndecode + sampling + patchify, in-process (30 fps, sampled at 2 fps; median of {args.repeats})\n")
    print("| video | size | file MB | frames sampled | ms | ms per second of video |\n|---|---|---|---|---|---|")
    for w, h in args.decode_sizes:
        for seconds in args.decode_seconds:
            cost = decode_cost(model, (w, h), seconds, args.repeats)
            print(f"| {seconds:g} s | {w}x{h} | {cost['mb']:.1f} | {cost['frames']} | {cost['ms']:.0f} | "
                  f"{cost['ms_per_s']:.1f} |")
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
