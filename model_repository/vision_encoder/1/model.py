"""vision_encoder: _PIXEL_VALUES [P, D], _IMAGE_LAYOUT [N, 3] -> _IMAGE_EMBEDS [sum tokens, H].
On a KIND_GPU instance the embeddings stay on that instance's GPU (DLPack)."""

import triton_python_backend_utils as pb_utils

from triton_vlm import interface as I
from triton_vlm.config import EncoderConfig
from triton_vlm.encode.encoder import VisionEncoder
from triton_vlm.serving import metrics, triton_io


class TritonPythonModel:
    def initialize(self, args):
        self.supervisor = triton_io.supervise()  # heals dead stubs, exits if the server dies
        config = EncoderConfig.from_parameters(triton_io.parameters(args), device=triton_io.device(args),
                                              instances=triton_io.instance_count(args))
        self.engine = VisionEncoder(config)
        self.metrics = metrics.ReplicaMetrics(args["model_instance_name"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                pixels = triton_io.input_tensor(request, I.PIXEL_VALUES)
                grid = triton_io.inputs(request, [I.IMAGE_LAYOUT])[I.IMAGE_LAYOUT]
                embeds = self.engine.encode(pixels, grid)
                self.metrics.encoded(len(grid), pixels.shape[0])
                responses.append(pb_utils.InferenceResponse([triton_io.output(I.IMAGE_EMBEDS, embeds)]))
            except Exception as e:
                responses.append(triton_io.error_response(e))
        return responses

    def finalize(self):
        self.supervisor.stop()
