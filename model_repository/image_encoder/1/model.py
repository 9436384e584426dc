"""image_encoder (E/PD encoder servers): _IMAGES [N] (encoded image files), _IMAGE_KEYS [N] (optional
content keys) -> _IMAGE_EMBEDS [sum tokens, H], _IMAGE_LAYOUT [N, 3]. Grids come from the file headers;
images whose embeddings are cached (by key) are neither decoded nor encoded; the others are decoded,
patchified and encoded on this server's `vision_encoder` instances, split by tokens (a family that
encodes pieces of images, InternVL's tiles, has its images decoded first and split by pieces). Files only: it
never fetches a URL. A bad image gets INVALID_ARG (the caller must not take it for a failing encoder)."""

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_vlm import interface as I
from triton_vlm.config import EncodeConfig, PreprocessConfig
from triton_vlm.encode.stage import ImageEncoderStage
from triton_vlm.models import load_family
from triton_vlm.serving import metrics, triton_io


class TritonPythonModel:
    def initialize(self, args):
        self.supervisor = triton_io.supervise()  # heals dead stubs, exits if the server dies
        params = triton_io.parameters(args)
        encode = EncodeConfig.from_parameters(params, shared=(PreprocessConfig,))
        self.stage = ImageEncoderStage(
            PreprocessConfig.from_parameters(params, shared=(EncodeConfig,)), encode, load_family(encode.model_path),
            triton_io.encode_on_replicas,
            cache=metrics.embedding_cache(encode.embedding_cache_mb, encode.embedding_cache_redis, tier="encoder"),
            on_split=metrics.EncodeMetrics("image_encoder").encoded)

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        try:
            arrays = triton_io.inputs(request, [I.IMAGES, I.IMAGE_KEYS])
            keys = [bytes(k) for k in arrays.get(I.IMAGE_KEYS, np.zeros(0, np.object_))]
            embeds, layout = self.stage([bytes(f) for f in arrays[I.IMAGES]], keys)
        except Exception as e:
            return triton_io.error_response(e, "image_encoder")
        return pb_utils.InferenceResponse([triton_io.output(I.IMAGE_EMBEDS, embeds),
                                           triton_io.output(I.IMAGE_LAYOUT, layout)])

    def finalize(self):
        self.supervisor.stop()
        self.stage.shutdown()
