"""Call the internal steps of the ensemble one by one (gRPC): `preprocess`, then `encode`.

For the encoder benchmarks and tests: they time the encode stage alone and read its embeddings.
"""

from __future__ import annotations

import queue
import time

import numpy as np

from .client import build_inputs, infer_inputs

PREPROCESSED = ("_INPUT_IDS", "_PIXEL_VALUES", "_IMAGE_LAYOUT", "_SAMPLING", "_IMAGES")  # no keys: no cache


def preprocess(url: str, prompt: str, images: list[bytes] | None = None, timeout_s: float = 300,
               **media) -> dict[str, np.ndarray]:
    """`preprocess`'s outputs (token ids, pixels, image_grid_thw, sampling, files), as the ensemble passes them on.
    `media`: `videos`, `mm_processor_kwargs`."""
    import tritonclient.grpc as grpcclient

    inputs = build_inputs(grpcclient, prompt=prompt, images=images, **media)
    result = _one_streamed(url, "preprocess", inputs, timeout_s)[0]
    return {name: result.as_numpy(name) for name in PREPROCESSED}


def _one_streamed(url: str, model: str, inputs: list, timeout_s: float):
    """One request to a decoupled model over a gRPC stream -> (its one response, seconds it took)."""
    import tritonclient.grpc as grpcclient

    events: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(url) as client:
        client.start_stream(callback=lambda result, error: events.put((result, error)))
        try:
            start = time.perf_counter()
            client.async_stream_infer(model, inputs)
            result, error = events.get(timeout=timeout_s)
            elapsed = time.perf_counter() - start
        finally:
            client.stop_stream()
    if error is not None:
        raise error
    return result, elapsed


def encode(url: str, preprocessed: dict[str, np.ndarray], timeout_s: float = 300) -> tuple[np.ndarray, float]:
    """One call of the (decoupled) `encode` stage -> (embeddings [tokens, H], seconds it took)."""
    import tritonclient.grpc as grpcclient

    result, elapsed = _one_streamed(url, "encode", infer_inputs(grpcclient, preprocessed), timeout_s)
    return result.as_numpy("_IMAGE_EMBEDS"), elapsed
