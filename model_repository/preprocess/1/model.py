"""preprocess: text_input | messages, images, sampling knobs -> _INPUT_IDS [S], _PIXEL_VALUES [P, D],
_IMAGE_GRID_THW [N, 3], _SAMPLING (JSON), _IMAGES (the image files, when encoder servers preprocess them;
else empty). A bad request gets INVALID_ARG naming its problem."""

import triton_python_backend_utils as pb_utils

from triton_vlm import interface as I
from triton_vlm import triton_io
from triton_vlm.config import PreprocessConfig
from triton_vlm.preprocess import Preprocessor
from triton_vlm.protocol import request_from_arrays


class TritonPythonModel:
    def initialize(self, args):
        self.engine = Preprocessor(PreprocessConfig.from_parameters(triton_io.parameters(args)))

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        try:
            arrays = triton_io.inputs(request, I.PUBLIC_INPUTS)
            out = self.engine(request_from_arrays(arrays, self.engine.default_sampling))
        except Exception as e:  # RequestError -> INVALID_ARG; anything else must not kill the instance
            return triton_io.error_response(e)
        return pb_utils.InferenceResponse([
            triton_io.output(I.INPUT_IDS, out.input_ids),
            triton_io.output(I.PIXEL_VALUES, out.pixel_values),
            triton_io.output(I.IMAGE_GRID_THW, out.image_grid_thw),
            triton_io.text_tensor(I.SAMPLING, out.sampling.to_json()),
            triton_io.bytes_tensor(I.IMAGES, out.image_files),
        ])
