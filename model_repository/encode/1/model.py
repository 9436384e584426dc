"""encode (decoupled): _PIXEL_VALUES [P, D] or _IMAGES [N] (image files), _IMAGE_GRID_THW [N, 3]
-> _IMAGE_EMBEDS [sum tokens, H]; _INPUT_IDS, _IMAGE_GRID_THW and _SAMPLING pass through (an ensemble
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
from triton_vlm import metrics, triton_io
from triton_vlm.config import EncodeConfig
from triton_vlm.dispatch import ShardedEncode, even
from triton_vlm.image_inputs import ImageProcessing, Images
from triton_vlm.images import ImageLimits
from triton_vlm.models import load_family
from triton_vlm.remote_encoders import RemoteEncoders

_PASS_THROUGH = [I.INPUT_IDS, I.IMAGE_GRID_THW, I.SAMPLING]
_CHECKED = ImageLimits(max_bytes=2**62, max_pixels=2**62)  # preprocess checked them against the limits


class _LocalEncoder:
    """The `vision_encoder` instances of this server; image files are preprocessed here first."""

    def __init__(self, model_path):
        self.processing = ImageProcessing(model_path)

    def __call__(self, images, target=None):
        pixels, grid = images.pixel_values, images.grid_thw
        if images.files is not None:
            pixels, grid = self.processing.decode(images.files, _CHECKED)
        return triton_io.encode_on_replicas(pixels, grid)


class TritonPythonModel:
    def initialize(self, args):
        self.supervisor = triton_io.supervise()  # heals dead stubs, exits if the server dies
        config = EncodeConfig.from_parameters(triton_io.parameters(args))
        family = load_family(config.model_path)
        local = _LocalEncoder(config.model_path)
        if config.remote_encoders or config.encoder_urls_file:
            fallback = local if config.encoder_fallback == "local" else None
            remote = RemoteEncoders(config.remote_encoders, fallback=fallback, timeout_s=config.encoder_timeout_s,
                                    local_below=config.local_encode_below, transport=config.encoder_transport,
                                    embedding_bytes=lambda images: family.embedding_bytes(images.grid_thw))
            self.remote = remote
            elsewhere = "the other encoders or the local encoder" if fallback else "the others"
            for url, ready in remote.probe().items():
                if not ready:
                    pb_utils.Logger.log_warn(f"encoder server {url} is unreachable at start; its shards go to "
                                             f"{elsewhere}")
            if config.encoder_urls_file:
                remote.watch(config.encoder_urls_file, _log_encoders)
            self.remote_metrics = metrics.RemoteEncoderMetrics(remote.state)
            run, split = remote, remote.split
        else:
            run, split, self.remote = local, even(config.data_parallel), None
        self.stage = ShardedEncode(run, split, family.tokens_per_image, family.embedding_width,
                                   cache=metrics.embedding_cache(config.embedding_cache_mb,
                                                                 config.embedding_cache_redis),
                                   on_split=metrics.EncodeMetrics("encode").encoded)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                passed = triton_io.inputs(request, _PASS_THROUGH)
                files = triton_io.inputs(request, [I.IMAGES]).get(I.IMAGES, np.zeros(0, np.object_))
                grid = passed[I.IMAGE_GRID_THW]
                if len(files):
                    images = Images(grid, files=tuple(bytes(f) for f in files))
                else:
                    images = Images(grid, pixel_values=triton_io.input_tensor(request, I.PIXEL_VALUES))
                keys = triton_io.inputs(request, [I.IMAGE_KEYS]).get(I.IMAGE_KEYS, np.zeros(0, np.object_))
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


def _log_encoders(urls):
    pb_utils.Logger.log_info(f"encoder servers now: {', '.join(urls) or 'none (local fallback)'}")


class _Reply:
    """Answers one request from the worker thread; holds the request so its input memory stays alive."""

    def __init__(self, request, sender, passed):
        self.request, self.sender, self.passed = request, sender, passed

    def __call__(self, embeds, error):
        if error is not None:
            self.sender.send(triton_io.error_response(error, "encode"), flags=triton_io.FINAL)
        else:
            outputs = [triton_io.output(I.IMAGE_EMBEDS, embeds)]
            outputs += [triton_io.output(name, value) for name, value in self.passed.items()]
            self.sender.send(pb_utils.InferenceResponse(outputs), flags=triton_io.FINAL)
        self.request = None
