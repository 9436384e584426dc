"""perf_analyzer `--input-data` JSON for the `vlm` interface, with real encoded images.

Images travel as `data:` URLs (BYTES elements in perf_analyzer's JSON are text), which `preprocess`
decodes like uploaded bytes. The same file drives `vlm` (streaming ensemble), `vlm_unary` and
`preprocess`, since they share the public inputs. With `--encoder MODEL` it writes instead the inputs
of `vision_encoder` (pixel patches and grids from MODEL's image processor): every input there is
required, which perf_analyzer's `--shared-memory` needs.

    python -m triton_vlm_clients.perf_inputs perf_inputs.json --entries 4 --image-count 2 \
        --image-resolution 448x448 --max-tokens 16
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

import numpy as np

from .dataset import make_image, parse_resolution


def input_data(entries: int = 4, image_count: int = 1, resolution: str = "448x448", max_tokens: int = 16,
               prompt: str = "Describe the pictures.", image_format: str = "jpeg", seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    width, height = parse_resolution(resolution)
    mime = "image/jpeg" if image_format == "jpeg" else "image/png"
    data = []
    for _ in range(entries):
        urls = [f"data:{mime};base64,{base64.b64encode(make_image(width, height, rng, image_format)).decode()}"
                for _ in range(image_count)]
        data.append({
            "text_input": [prompt],
            "images": {"content": urls, "shape": [len(urls)]},
            "max_tokens": [max_tokens],
        })
    return {"data": data}


def encoder_input_data(model: str | Path, entries: int = 2, image_count: int = 1, resolution: str = "448x448",
                       seed: int = 0) -> dict:
    import io

    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(model, use_fast=False)
    rng = np.random.default_rng(seed)
    width, height = parse_resolution(resolution)
    data = []
    for _ in range(entries):
        images = [Image.open(io.BytesIO(make_image(width, height, rng))).convert("RGB") for _ in range(image_count)]
        vision = processor(images=images, return_tensors="np")
        pixels, grid = vision["pixel_values"].astype(np.float32), vision["image_grid_thw"].astype(np.int64)
        data.append({
            "_PIXEL_VALUES": {"content": pixels.reshape(-1).tolist(), "shape": list(pixels.shape)},
            "_IMAGE_LAYOUT": {"content": grid.reshape(-1).tolist(), "shape": list(grid.shape)},
        })
    return {"data": data}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--entries", type=int, default=4, help="distinct requests, sent round-robin")
    p.add_argument("--image-count", type=int, default=1)
    p.add_argument("--image-resolution", default="448x448")
    p.add_argument("--image-format", choices=["jpeg", "png"], default="jpeg")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt", default="Describe the pictures.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoder", metavar="MODEL", help="write `vision_encoder` inputs made with MODEL's image processor")
    args = p.parse_args(argv)
    if args.encoder:
        data = encoder_input_data(args.encoder, args.entries, args.image_count, args.image_resolution, args.seed)
    else:
        data = input_data(args.entries, args.image_count, args.image_resolution, args.max_tokens, args.prompt,
                          args.image_format, args.seed)
    args.out.write_text(json.dumps(data) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
