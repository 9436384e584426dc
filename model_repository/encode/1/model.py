"""encode (decoupled): _PIXEL_VALUES [P, D], _IMAGE_GRID_THW [N, 3] -> _IMAGE_EMBEDS [sum tokens, H];
_INPUT_IDS, _IMAGE_GRID_THW and _SAMPLING pass through (an ensemble step may take its inputs from one
decoupled origin only, so the language model gets all of them from here).

Splits the images into up to `data_parallel` patch-balanced shards and runs them in parallel on the
`vision_encoder` instances (BLS). Decoupled so that `execute` returns at once: requests are encoded
on worker threads and answered through their response senders, never one after another."""

import triton_python_backend_utils as pb_utils

from triton_vlm import interface as I
from triton_vlm import triton_io
from triton_vlm.config import EncodeConfig
from triton_vlm.dispatch import ShardedEncode
from triton_vlm.models import load_family
from triton_vlm.remote_encoders import RemoteEncoders

_PASS_THROUGH = [I.INPUT_IDS, I.IMAGE_GRID_THW, I.SAMPLING]


def _run_shard(pixel_values, grid_thw):
    inputs = [triton_io.output(I.PIXEL_VALUES, pixel_values), triton_io.output(I.IMAGE_GRID_THW, grid_thw)]
    return triton_io.infer("vision_encoder", inputs, [I.IMAGE_EMBEDS])[I.IMAGE_EMBEDS]


def _remote(config):
    """E/PD: shards go to the encoder servers (one shard per server), the local encoder as fallback."""
    fallback = _run_shard if config.encoder_fallback == "local" else None
    remote = RemoteEncoders(config.remote_encoders, fallback=fallback, timeout_s=config.encoder_timeout_s)
    for url, ready in remote.probe().items():
        if not ready:
            pb_utils.Logger.log_warn(f"encoder server {url} is unreachable at start; its shards go to "
                                     f"{'the other encoders or the local encoder' if fallback else 'the others'}")
    return remote


class TritonPythonModel:
    def initialize(self, args):
        config = EncodeConfig.from_parameters(triton_io.parameters(args))
        family = load_family(config.model_path)
        remote = _remote(config) if config.remote_encoders or config.encoder_urls_file else None
        shards = max(1, len(config.remote_encoders)) if remote else config.data_parallel
        self.stage = ShardedEncode(remote or _run_shard, shards, family.tokens_per_image, family.hidden_size)
        if config.encoder_urls_file:
            remote.watch(config.encoder_urls_file, self._encoders_changed)

    def _encoders_changed(self, urls):
        self.stage.num_shards = max(1, len(urls))
        pb_utils.Logger.log_info(f"encoder servers now: {', '.join(urls) or 'none (local fallback)'}")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                pixels = triton_io.input_tensor(request, I.PIXEL_VALUES)
                passed = triton_io.inputs(request, _PASS_THROUGH)
                self.stage.submit(pixels, passed[I.IMAGE_GRID_THW], _Reply(request, sender, passed))
            except Exception as e:
                sender.send(triton_io.error_response(e), flags=triton_io.FINAL)
        return None

    def finalize(self):
        self.stage.shutdown()


class _Reply:
    """Answers one request from the worker thread; holds the request so its input memory stays alive."""

    def __init__(self, request, sender, passed):
        self.request, self.sender, self.passed = request, sender, passed

    def __call__(self, embeds, error):
        if error is not None:
            self.sender.send(triton_io.error_response(error), flags=triton_io.FINAL)
        else:
            outputs = [triton_io.output(I.IMAGE_EMBEDS, embeds)]
            outputs += [triton_io.output(name, value) for name, value in self.passed.items()]
            self.sender.send(pb_utils.InferenceResponse(outputs), flags=triton_io.FINAL)
        self.request = None
