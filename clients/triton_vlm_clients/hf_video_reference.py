"""The video parity yardstick: transformers' own processor (its torchvision video processor, frames loaded
by transformers' PyAV loader) and model `generate`, greedy. It needs torchvision, which has no CPU build
for our torch, so it runs in an environment of its own (`scripts/setup-video-ref.sh`) as a script:

    .tools/video-ref/bin/python clients/triton_vlm_clients/hf_video_reference.py request.json out.npz
    .tools/video-ref/bin/python clients/triton_vlm_clients/hf_video_reference.py --serve

`--serve` answers many requests in one process (its imports take seconds): each line on stdin is
"request.json<TAB>out.npz", answered by one line on stdout, "ok" or "error: " and the traceback as JSON.

request.json: {"model": path, "messages": chat messages whose parts are {"type": "text"}, {"type": "image",
"path": ...} or {"type": "video", "path": ...}, "fps": F or null, "max_frames": N or null, "max_tokens": N}.
out.npz: input_ids, output_ids (the new tokens; none for "max_tokens": 0), pixel_values_videos,
video_grid_thw. Imports nothing of triton-vlm but the baseline's processor settings."""

from __future__ import annotations

import json
import sys
import traceback
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
    if images and videos and processor.__class__.__name__ == "Glm4vProcessor":
        glm_images_and_videos(request, processor, prompt, images, videos, metadata, kwargs, out_path)
        return
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


def glm_images_and_videos(request, processor, prompt, images, videos, metadata, kwargs, out_path) -> None:
    """GLM-4.1V with images and videos in one prompt, which transformers 4.57's `Glm4vProcessor` and model
    refuse ("Image features and image tokens do not match": a video's tokens are image tokens, and both the
    processor's video expansion and the model's image scatter take the first image tokens they meet). Built
    here from their own parts instead: the processor expands each image and video block alone (blocks are
    delimited by special tokens, so their ids concatenate), the model's `get_image_features`,
    `get_video_features` and `get_rope_index` (which tells a video's image tokens by `<|begin_of_video|>`),
    and greedy steps of the model's full forward."""
    import re

    tokenizer = processor.tokenizer
    blocks = re.split(r"(<\|begin_of_image\|><\|image\|><\|end_of_image\|>|<\|begin_of_video\|><\|video\|>"
                      r"<\|end_of_video\|>)", prompt)
    ids, image_inputs, video_inputs, next_image, next_video = [], [], [], 0, 0
    for block in blocks:
        if block.startswith("<|begin_of_image|>"):
            out = processor(text=[block], images=[images[next_image]], return_tensors="pt")
            image_inputs.append(out)
            next_image += 1
        elif block.startswith("<|begin_of_video|>"):
            out = processor(text=[block], videos=[videos[next_video]], video_metadata=[metadata[next_video]],
                            do_sample_frames=True, return_tensors="pt", **kwargs)
            video_inputs.append(out)
            next_video += 1
        else:
            ids += tokenizer(block, add_special_tokens=False)["input_ids"]
            continue
        ids += out["input_ids"][0].tolist()
    ids = torch.tensor(ids)
    image_grid = torch.cat([x["image_grid_thw"] for x in image_inputs])
    video_grid = torch.cat([x["video_grid_thw"] for x in video_inputs])
    model = AutoModelForImageTextToText.from_pretrained(request["model"], torch_dtype=torch.float32).eval()
    config = model.config
    with torch.inference_mode():
        image_embeds = torch.cat(model.model.get_image_features(torch.cat([x["pixel_values"] for x in image_inputs]),
                                                                image_grid))
        video_embeds = torch.cat(model.model.get_video_features(
            torch.cat([x["pixel_values_videos"] for x in video_inputs]), video_grid))
        in_video = torch.cumsum((ids == config.video_start_token_id).int() - (ids == config.video_end_token_id).int(),
                                0) > 0
        is_image = ids == config.image_token_id
        embeds = model.get_input_embeddings()(ids).clone()
        embeds[is_image & ~in_video] = image_embeds
        embeds[is_image & in_video] = video_embeds
        positions, delta = model.model.get_rope_index(ids[None], image_grid, video_grid, torch.ones(1, len(ids)))
        eos = model.generation_config.eos_token_id
        eos, new = (eos if isinstance(eos, list) else [eos]), []
        for _ in range(request["max_tokens"]):
            logits = model(inputs_embeds=embeds[None], position_ids=positions, use_cache=False,
                           attention_mask=torch.ones(1, len(embeds), dtype=torch.long)).logits
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token in eos:  # as generate stops
                break
            embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([token]))])
            position = positions[:, :, -1:].max() + 1
            positions = torch.cat([positions, position.expand(3, 1, 1)], dim=2)
    np.savez(out_path, input_ids=ids.numpy(), output_ids=np.asarray(new, np.int64),
             pixel_values_videos=torch.cat([x["pixel_values_videos"] for x in video_inputs]).numpy(),
             video_grid_thw=video_grid.numpy())


def serve() -> None:
    replies, sys.stdout = sys.stdout, sys.stderr  # what the libraries print is not a reply
    for line in sys.stdin:
        try:
            main(*line.rstrip("\n").split("\t"))
            replies.write("ok\n")
        except Exception:
            replies.write("error: " + json.dumps(traceback.format_exc()) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve() if sys.argv[1:] == ["--serve"] else main(*sys.argv[1:])
