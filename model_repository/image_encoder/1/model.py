"""image_encoder (E/PD encoder servers): _IMAGES [N] (encoded image files) -> _IMAGE_EMBEDS [sum tokens, H],
_IMAGE_GRID_THW [N, 3]. Decodes and patchifies the files, then encodes them on this server's
`vision_encoder` instances, split by patch count. Files only: it never fetches a URL. A bad image
gets INVALID_ARG (the caller must not take it for a failing encoder)."""

import torch
import triton_python_backend_utils as pb_utils

from triton_vlm import interface as I
from triton_vlm import triton_io
from triton_vlm.config import EncodeConfig, PreprocessConfig
from triton_vlm.dispatch import ShardedEncode, even
from triton_vlm.image_inputs import ImageProcessing, Images
from triton_vlm.models import load_family


def _run_shard(images, target=None):
    return triton_io.encode_on_replicas(images.pixel_values, images.grid_thw)


class TritonPythonModel:
    def initialize(self, args):
        self.supervisor = triton_io.supervise()  # heals dead stubs, exits if the server dies
        params = triton_io.parameters(args)
        self.limits = PreprocessConfig.from_parameters(params)
        encode = EncodeConfig.from_parameters(params)
        family = load_family(encode.model_path)
        self.processing = ImageProcessing(encode.model_path)
        self.stage = ShardedEncode(_run_shard, even(encode.data_parallel), family.tokens_per_image,
                                   family.hidden_size)

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        try:
            files = [bytes(f) for f in triton_io.inputs(request, [I.IMAGES])[I.IMAGES]]
            self.limits.check_image_count(len(files))
            pixels, grid = self.processing.decode(files, self.limits.image_limits)
            embeds = self.stage.encode(Images(grid, pixel_values=torch.from_numpy(pixels)))
        except Exception as e:
            return triton_io.error_response(e)
        return pb_utils.InferenceResponse([triton_io.output(I.IMAGE_EMBEDS, embeds),
                                           triton_io.output(I.IMAGE_GRID_THW, grid)])

    def finalize(self):
        self.supervisor.stop()
        self.stage.shutdown()
