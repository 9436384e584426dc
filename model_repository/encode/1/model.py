"""encode (decoupled): _PIXEL_VALUES [P, D] or _IMAGES [N] (image files), _IMAGE_LAYOUT [N, 3]
-> _IMAGE_EMBEDS [sum tokens, H]; _INPUT_IDS, _IMAGE_LAYOUT, _SAMPLING and _IMAGE_KEYS pass through (an ensemble
step may take its inputs from one decoupled origin only, so the language model gets all of them here).

Colocated: splits the images into up to `data_parallel` patch-balanced shards and runs them in parallel
on the `vision_encoder` instances (BLS). E/PD (`encoder_urls`): the image files go to the encoder
servers, one shard each, and come back as embeddings; local encoding is the fallback. Decoupled so
that `execute` returns at once: requests are encoded on worker threads and answered through their
response senders, never one after another. With `_IMAGE_KEYS`, images whose embeddings are cached
(`embedding_cache_mb`, by content) are not encoded again."""

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_vlm import interface as I
from triton_vlm.config import EncodeConfig
from triton_vlm.encode.stage import encode_stage
from triton_vlm.models import load_family
from triton_vlm.preprocess.image_inputs import Images
from triton_vlm.serving import metrics, triton_io
from triton_vlm.serving.cuda_copies import CopyTrace

_PASS_THROUGH = [I.INPUT_IDS, I.IMAGE_LAYOUT, I.SAMPLING]


class TritonPythonModel:
    def initialize(self, args):
        self.supervisor = triton_io.supervise()  # heals dead stubs, exits if the server dies
        self.copies = CopyTrace("encode")  # with TRITON_VLM_CUDA_COPY_TRACE only (the GPU check)
        config = EncodeConfig.from_parameters(triton_io.parameters(args))
        self.family = load_family(config.model_path)
        self.stage, self.remote = encode_stage(
            config, self.family, triton_io.encode_on_replicas,
            cache=metrics.embedding_cache(config.embedding_cache_mb, config.embedding_cache_redis),
            on_split=metrics.EncodeMetrics("encode").encoded,
            warn=pb_utils.Logger.log_warn, info=pb_utils.Logger.log_info)
        self.remote_metrics = metrics.RemoteServerMetrics("encoder", self.remote.state) if self.remote else None

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                passed = triton_io.inputs(request, _PASS_THROUGH)
                files = triton_io.inputs(request, [I.IMAGES]).get(I.IMAGES, np.zeros(0, np.object_))
                grid = passed[I.IMAGE_LAYOUT]
                if len(files):
                    images = Images.of(self.family, grid, files=tuple(bytes(f) for f in files))
                else:
                    images = Images.of(self.family, grid, pixel_values=triton_io.input_tensor(request, I.PIXEL_VALUES))
                keys = triton_io.inputs(request, [I.IMAGE_KEYS]).get(I.IMAGE_KEYS, np.zeros(0, np.object_))
                passed[I.IMAGE_KEYS] = keys  # on to the language model's prefix cache
                self.stage.submit(images, _Reply(request, sender, passed), keys=[bytes(k) for k in keys])
            except Exception as e:
                sender.send(triton_io.error_response(e, "encode"), flags=triton_io.FINAL)
        return None

    def finalize(self):
        self.supervisor.stop()
        self.stage.shutdown()
        if self.remote is not None:
            self.remote_metrics.stop()
            self.remote.close()
        self.copies.stop()


class _Reply:
    """Answers one request from the worker thread; holds the request so its input memory stays alive."""

    def __init__(self, request, sender, passed):
        self.request, self.sender, self.passed = request, sender, passed

    def __call__(self, embeds, error):
        triton_io.answer(self.sender, "encode", error, lambda: pb_utils.InferenceResponse(
            [triton_io.output(I.IMAGE_EMBEDS, embeds)]
            + [triton_io.output(name, value) for name, value in self.passed.items()]))
        self.request = None
