"""The video parity yardstick: transformers' own processor (its torchvision video processor, frames loaded
by transformers' PyAV loader) and model `generate`, greedy. It needs torchvision, which has no CPU build
for our torch, so it runs in an environment of its own (`scripts/setup-video-ref.sh`) as a script:

    .tools/video-ref/bin/python clients/triton_vlm_clients/hf_video_reference.py request.json out.npz

request.json: {"model": path, "messages": chat messages whose parts are {"type": "text"}, {"type": "image",
"path": ...} or {"type": "video", "path": ...}, "fps": F or null, "max_frames": N or null, "max_tokens": N}.
out.npz: input_ids, output_ids (the new tokens; none for "max_tokens": 0), pixel_values_videos,
video_grid_thw. Imports nothing of triton-vlm but the baseline's processor settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor
from transformers.video_utils import load_video

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this environment has no triton-vlm installed
from triton_vlm_clients.hf_baseline import slow_processor_kwargs  # noqa: E402


def main(request_path: str, out_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    processor = AutoProcessor.from_pretrained(request["model"])
    # images through the slow image processor, as the image parity tests take them (the video one is fast)
    processor.image_processor = AutoImageProcessor.from_pretrained(request["model"], use_fast=False,
                                                                   **slow_processor_kwargs(request["model"]))
    if request.get("max_frames"):
        processor.video_processor.max_frames = request["max_frames"]
    images, videos, metadata, conversation = [], [], [], []
    for message in request["messages"]:
        parts = []
        for part in message["content"]:
            if part["type"] == "image":
                images.append(Image.open(part["path"]).convert("RGB"))
            elif part["type"] == "video":
                frames, meta = load_video(part["path"], backend="pyav")  # every frame; the processor samples
                videos.append(frames)
                metadata.append(meta)
            parts.append({k: v for k, v in part.items() if k != "path"})
        conversation.append({"role": message["role"], "content": parts})
    prompt = processor.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    kwargs = {"fps": request["fps"]} if request.get("fps") else {}
    inputs = processor(text=[prompt], images=images or None, videos=videos or None,
                       video_metadata=metadata or None, do_sample_frames=True, return_tensors="pt", **kwargs)
    inputs.pop("video_metadata", None)
    prompt_ids = inputs["input_ids"][0]
    new_ids = np.zeros(0, np.int64)
    if request["max_tokens"]:  # 0: the processor's output alone
        model = AutoModelForImageTextToText.from_pretrained(request["model"], torch_dtype=torch.float32).eval()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=request["max_tokens"], do_sample=False)
        new_ids = out[0, len(prompt_ids):]
    np.savez(out_path, input_ids=prompt_ids.numpy(), output_ids=np.asarray(new_ids),
             pixel_values_videos=inputs["pixel_values_videos"].numpy() if videos else np.zeros((0, 0), np.float32),
             video_grid_thw=inputs["video_grid_thw"].numpy() if videos else np.zeros((0, 3), np.int64))


if __name__ == "__main__":
    main(*sys.argv[1:])
