"""preprocess (decoupled): text_input | messages, images, sampling knobs -> _INPUT_IDS [S], _PIXEL_VALUES [P, D],
_IMAGE_LAYOUT [N, 3], _SAMPLING (JSON), _IMAGES (the image files, when encoder servers preprocess them;
else empty), _IMAGE_KEYS [N] (content keys for the embedding cache), in one FINAL response. A bad request
gets INVALID_ARG naming its problem. Decoupled so that a request waiting on a slow image URL never holds
the instance (the fetch waits on an I/O thread)."""

import time

import triton_python_backend_utils as pb_utils

from triton_vlm import interface as I
from triton_vlm.config import PreprocessConfig
from triton_vlm.preprocess.stage import Preprocessor, PreprocessStage
from triton_vlm.protocol import request_from_arrays
from triton_vlm.serving import triton_io


class TritonPythonModel:
    def initialize(self, args):
        self.supervisor = triton_io.supervise()  # heals dead stubs, exits if the server dies
        self.engine = Preprocessor(PreprocessConfig.from_parameters(triton_io.parameters(args)))
        self.stage = PreprocessStage(self.engine)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                arrays = triton_io.inputs(request, I.PUBLIC_INPUTS)
                parsed = request_from_arrays(arrays, self.engine.default_sampling.with_overrides(arrival_s=time.time()))
            except Exception as e:  # RequestError -> INVALID_ARG; anything else must not kill the instance
                sender.send(triton_io.error_response(e, "preprocess"), flags=triton_io.FINAL)
                continue
            self.stage.submit(parsed, _Reply(request, sender))
        return None

    def finalize(self):
        self.supervisor.stop()
        self.stage.shutdown()


class _Reply:
    """Answers one request (on whichever thread finished it); holds the request until then."""

    def __init__(self, request, sender):
        self.request, self.sender = request, sender

    def __call__(self, out, error):
        triton_io.answer(self.sender, "preprocess", error, lambda: pb_utils.InferenceResponse([
            triton_io.output(I.INPUT_IDS, out.input_ids),
            triton_io.output(I.PIXEL_VALUES, out.pixel_values),
            triton_io.output(I.IMAGE_LAYOUT, out.image_grid_thw),
            triton_io.text_tensor(I.SAMPLING, out.sampling.to_json()),
            triton_io.bytes_tensor(I.IMAGES, out.image_files),
            triton_io.bytes_tensor(I.IMAGE_KEYS, out.image_keys),
        ]))
        self.request = None
