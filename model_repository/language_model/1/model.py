"""language_model (decoupled): _INPUT_IDS, _IMAGE_EMBEDS, _IMAGE_GRID_THW, _SAMPLING -> text_output,
output_ids, finish_reason, num_input_tokens, num_output_tokens (so far). Streaming: one response per new
token (deltas), the last one FINAL with the finish_reason. Otherwise one FINAL response with everything.
Errors: an error response, then FINAL. `cancel_request_id` alone: that request ends ("cancelled"); this
one gets only FINAL."""

import time
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_vlm import interface as I
from triton_vlm.config import LanguageConfig
from triton_vlm.engine.language import LanguageEngine, LanguageRequest
from triton_vlm.errors import InvalidRequest
from triton_vlm.protocol import SamplingParams
from triton_vlm.serving import metrics, triton_io
from triton_vlm.serving.responses import Outbox, ResponseStream


def _response(ids, text, finish_reason, num_input_tokens, num_output_tokens):
    return pb_utils.InferenceResponse([
        triton_io.text_tensor("text_output", text),
        triton_io.output("output_ids", np.asarray(ids, dtype=np.int64)),
        triton_io.text_tensor("finish_reason", finish_reason or ""),
        triton_io.output("num_input_tokens", np.array([num_input_tokens], dtype=np.int32)),
        triton_io.output("num_output_tokens", np.array([num_output_tokens], dtype=np.int32)),
    ])


class _Wire:
    """How this model's responses look (`serving.responses` sends them)."""

    FINAL = triton_io.FINAL
    response = staticmethod(_response)

    @staticmethod
    def error(e):
        return triton_io.error_response(e, "language_model")


class TritonPythonModel:
    def initialize(self, args):
        self.supervisor = triton_io.supervise()  # heals dead stubs, exits if the server dies
        config = LanguageConfig.from_parameters(triton_io.parameters(args), device=triton_io.device(args))
        self.engine = LanguageEngine(config)
        self.metrics = metrics.EngineMetrics()
        self.outbox = Outbox(lambda: self.metrics.publish(self.engine.stats()))

    def execute(self, requests):
        arrival_s = time.time()  # when preprocess did not say (a caller of this model itself)
        for request in requests:
            sender = request.get_response_sender()
            try:
                arrays = triton_io.inputs(request, [I.INPUT_IDS, I.IMAGE_GRID_THW, I.SAMPLING, I.CANCEL])
                if I.CANCEL in arrays:  # a control request: end that request (if it runs), answer nothing
                    self.engine.abort(bytes(arrays[I.CANCEL].reshape(-1)[0]).decode(errors="replace"))
                    sender.send(flags=triton_io.FINAL)
                    continue
                if len(arrays) < 3 or pb_utils.get_input_tensor_by_name(request, I.IMAGE_EMBEDS) is None:
                    raise InvalidRequest("language_model takes _INPUT_IDS, _IMAGE_EMBEDS, _IMAGE_GRID_THW and "
                                         "_SAMPLING, or cancel_request_id alone")
                sampling = SamplingParams.from_json(arrays[I.SAMPLING].reshape(-1)[0]).validate()
                request_id = request.request_id() or uuid.uuid4().hex
                self.engine.submit(
                    LanguageRequest(request_id, arrays[I.INPUT_IDS], triton_io.input_tensor(request, I.IMAGE_EMBEDS),
                                    arrays[I.IMAGE_GRID_THW], sampling),
                    ResponseStream(self.engine, self.outbox, _Wire, sender, request_id, sampling.stream,
                                   len(arrays[I.INPUT_IDS]), sampling.arrival_s or arrival_s, self.metrics),
                )
            except Exception as e:
                sender.send(triton_io.error_response(e, "language_model"), flags=triton_io.FINAL)
        return None

    def finalize(self):
        self.supervisor.stop()
        self.engine.shutdown()
        self.outbox.close()
