"""Tensor names and types of every model in the repository; config.pbtxt files are checked against these."""

from __future__ import annotations

# public `vlm` / `vlm_unary` interface: name -> (config.pbtxt data_type, dims)
PUBLIC_INPUTS = {
    "text_input": ("TYPE_STRING", [1]),
    "messages": ("TYPE_STRING", [1]),
    "images": ("TYPE_STRING", [-1]),
    "videos": ("TYPE_STRING", [-1]),
    "mm_processor_kwargs": ("TYPE_STRING", [1]),  # JSON: the video sampling, {"fps": F, "max_frames": N}
    "max_tokens": ("TYPE_INT32", [1]),
    "temperature": ("TYPE_FP32", [1]),
    "top_p": ("TYPE_FP32", [1]),
    "top_k": ("TYPE_INT32", [1]),
    "seed": ("TYPE_INT32", [1]),
    "stream": ("TYPE_BOOL", [1]),
    "stop": ("TYPE_STRING", [-1]),
    "min_tokens": ("TYPE_INT32", [1]),
    "ignore_eos": ("TYPE_BOOL", [1]),
    "chat_template": ("TYPE_BOOL", [1]),
}
PUBLIC_OUTPUTS = {
    "text_output": ("TYPE_STRING", [1]),
    "output_ids": ("TYPE_INT64", [-1]),
    "finish_reason": ("TYPE_STRING", [1]),
    "num_input_tokens": ("TYPE_INT32", [1]),  # the prompt's tokens, image tokens included
    "num_output_tokens": ("TYPE_INT32", [1]),  # the tokens generated so far (all of them, in the last response)
}

# a control request to `language_model` (alone, no other input): end the request with this id. In Triton
# 2.51 a client's cancel does not reach an ensemble step that already runs, so cancelling a `vlm` stream
# does not stop its generation; clients send this as well.
CANCEL = "cancel_request_id"

# internal tensors between ensemble steps
INPUT_IDS = "_INPUT_IDS"  # INT64 [S]
PIXEL_VALUES = "_PIXEL_VALUES"  # FP32 [P, C*T*patch*patch]
IMAGE_LAYOUT = "_IMAGE_LAYOUT"  # INT64 [N, 3]: each image's layout (Qwen/GLM: t/h/w patch grid; InternVL: tile counts)
IMAGE_EMBEDS = "_IMAGE_EMBEDS"  # FP32 [sum tokens per image, H]
SAMPLING = "_SAMPLING"  # BYTES [1]: SamplingParams JSON
IMAGES = "_IMAGES"  # BYTES [N]: the encoded image files, when encoder servers preprocess them (else [0])
IMAGE_KEYS = "_IMAGE_KEYS"  # BYTES [N]: each image's content key, for the embedding cache and the prefix cache
# E/P/D: a request to a prefill server's `language_model` carries KV_FROM (prefill the prompt, answer with the KV
# of its tokens from this one on); the answer is KV and KV_META (`engine/kv_wire.py`), and output_ids (the first token)
KV_FROM = "_KV_FROM"  # INT64 [1]
KV_TARGET = "_KV_TARGET"  # BYTES [1], optional: JSON: where to WRITE the KV with NIXL (`engine/kv_nixl.py`)
KV = "_KV"  # UINT8 [bytes]: the keys, then the values, raw
KV_META = "_KV_META"  # BYTES [1]: JSON: their shape and dtype, the first token, the position delta, ...
OUTSIDE_ENSEMBLE = {CANCEL, KV_FROM, KV_TARGET, KV, KV_META}  # direct callers' tensors, not those of `vlm`'s steps

INTERNAL = {
    CANCEL: ("TYPE_STRING", [1]),
    INPUT_IDS: ("TYPE_INT64", [-1]),
    PIXEL_VALUES: ("TYPE_FP32", [-1, -1]),
    IMAGE_LAYOUT: ("TYPE_INT64", [-1, 3]),
    IMAGE_EMBEDS: ("TYPE_FP32", [-1, -1]),
    SAMPLING: ("TYPE_STRING", [1]),
    IMAGES: ("TYPE_STRING", [-1]),
    IMAGE_KEYS: ("TYPE_STRING", [-1]),
    KV_FROM: ("TYPE_INT64", [1]),
    KV_TARGET: ("TYPE_STRING", [1]),
    KV: ("TYPE_UINT8", [-1]),
    KV_META: ("TYPE_STRING", [1]),
}

# model name -> (inputs, outputs)
MODELS = {
    "preprocess": (list(PUBLIC_INPUTS), [INPUT_IDS, PIXEL_VALUES, IMAGE_LAYOUT, SAMPLING, IMAGES, IMAGE_KEYS]),
    "encode": ([INPUT_IDS, PIXEL_VALUES, IMAGE_LAYOUT, SAMPLING, IMAGES, IMAGE_KEYS],
               [INPUT_IDS, IMAGE_EMBEDS, IMAGE_LAYOUT, SAMPLING, IMAGE_KEYS]),
    "vision_encoder": ([PIXEL_VALUES, IMAGE_LAYOUT], [IMAGE_EMBEDS]),
    # E/PD encoder servers: image files in, embeddings and grids out (decode, resize, patchify, encode)
    "image_encoder": ([IMAGES, IMAGE_KEYS], [IMAGE_EMBEDS, IMAGE_LAYOUT]),
    "language_model": ([INPUT_IDS, IMAGE_EMBEDS, IMAGE_LAYOUT, SAMPLING, IMAGE_KEYS, KV_FROM, KV_TARGET, CANCEL],
                       [*PUBLIC_OUTPUTS, KV, KV_META]),
    "vlm": (list(PUBLIC_INPUTS), list(PUBLIC_OUTPUTS)),
    "vlm_unary": (list(PUBLIC_INPUTS), list(PUBLIC_OUTPUTS)),
}


def spec(name: str) -> tuple[str, list[int]]:
    return {**PUBLIC_INPUTS, **PUBLIC_OUTPUTS, **INTERNAL}[name]
