"""vlm_unary: the `vlm` tensors in, one response with the whole answer out, for plain infer() callers.
Forwards to the decoupled `vlm` ensemble (BLS) with stream=false and returns its single answer."""

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_vlm import interface as I
from triton_vlm.serving import triton_io


class TritonPythonModel:
    def initialize(self, args):
        self.supervisor = triton_io.supervise()  # heals dead stubs, exits if the server dies

    def execute(self, requests):
        # blocks this instance until the answer is complete: concurrency = instance count
        return [self._one(request) for request in requests]

    def _one(self, request):
        forwarded = [t for t in (pb_utils.get_input_tensor_by_name(request, n) for n in I.PUBLIC_INPUTS)
                     if t is not None and t.name() != "stream"]
        forwarded.append(pb_utils.Tensor("stream", np.array([False])))
        bls = pb_utils.InferenceRequest(model_name="vlm", inputs=forwarded,
                                        requested_output_names=list(I.PUBLIC_OUTPUTS))
        answer = None
        for response in bls.exec(decoupled=True):
            if response.has_error():  # BLS (2.51) reports every step error as INTERNAL: read the code back
                return pb_utils.InferenceResponse(output_tensors=[], error=triton_io.error_from_bls(response.error()))
            if response.output_tensors():
                answer = response
        if answer is None:
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError("vlm sent no answer"))
        return pb_utils.InferenceResponse([pb_utils.get_output_tensor_by_name(answer, n) for n in I.PUBLIC_OUTPUTS])

    def finalize(self):
        self.supervisor.stop()
