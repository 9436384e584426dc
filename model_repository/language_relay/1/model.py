"""language_relay (decoupled): `language_model`'s prompt tensors in, its responses out, passed on one by one.
Each request is relayed on a thread of its own (BLS); `serving/relay.py` ends the ones a dead language_model
stub held."""

import os
import threading

import triton_python_backend_utils as pb_utils

from triton_vlm import interface as I
from triton_vlm.errors import Unavailable
from triton_vlm.serving import triton_io
from triton_vlm.serving.relay import Relays
from triton_vlm.stubs import live_stubs

TARGET = "language_model"
INPUTS, OUTPUTS = I.MODELS["language_relay"]
LOST = Unavailable("the language model's process died while this request ran; it is being reloaded: send the "
                   "request again")


class TritonPythonModel:
    def initialize(self, args):
        self.supervisor = triton_io.supervise()  # heals dead stubs, exits if the server dies
        server = os.getppid()
        self.relays = Relays(lambda: live_stubs(server, TARGET),
                             lambda: triton_io.error_response(LOST, TARGET)).start()

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._relay, args=(request,), name="relay", daemon=True).start()
        return None

    def _relay(self, request):
        sender = request.get_response_sender()
        relayed = self.relays.open(lambda response, final: sender.send(response, flags=triton_io.FINAL if final
                                                                       else 0))
        try:
            inputs = [t for t in (pb_utils.get_input_tensor_by_name(request, n) for n in INPUTS) if t is not None]
            bls = pb_utils.InferenceRequest(model_name=TARGET, inputs=inputs, requested_output_names=OUTPUTS,
                                            request_id=request.request_id())
            for response in bls.exec(decoupled=True):  # after a relayed error or the end: drained, not sent
                if response.has_error():
                    error = triton_io.error_from_bls(response.error())
                    relayed.send(pb_utils.InferenceResponse(output_tensors=[], error=error), final=True)
                elif response.output_tensors():
                    finish = pb_utils.get_output_tensor_by_name(response, "finish_reason").as_numpy().reshape(-1)
                    relayed.send(pb_utils.InferenceResponse(response.output_tensors()), final=bool(finish[0]))
        except Exception as e:
            relayed.send(triton_io.error_response(e, TARGET), final=True)
        relayed.send(None, final=True)  # language_model ended with no answer of its own (nothing if it had one)

    def finalize(self):
        self.relays.stop()
        self.supervisor.stop()
