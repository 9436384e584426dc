"""language_model (decoupled): _INPUT_IDS, _IMAGE_EMBEDS, _IMAGE_GRID_THW, _SAMPLING -> text_output,
output_ids, finish_reason, num_input_tokens, num_output_tokens (so far). Streaming: one response per new
token (deltas), the last one FINAL with the finish_reason. Otherwise one FINAL response with everything.
Errors: an error response, then FINAL. `cancel_request_id` alone: that request ends ("cancelled"); this
one gets only FINAL."""

import queue
import threading
import time
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_vlm import interface as I
from triton_vlm import metrics, triton_io
from triton_vlm.config import LanguageConfig
from triton_vlm.errors import InvalidRequest
from triton_vlm.language import LanguageEngine, LanguageRequest, StepOutput
from triton_vlm.protocol import SamplingParams


def _response(ids, text, finish_reason, num_input_tokens, num_output_tokens):
    return pb_utils.InferenceResponse([
        triton_io.text_tensor("text_output", text),
        triton_io.output("output_ids", np.asarray(ids, dtype=np.int64)),
        triton_io.text_tensor("finish_reason", finish_reason or ""),
        triton_io.output("num_input_tokens", np.array([num_input_tokens], dtype=np.int32)),
        triton_io.output("num_output_tokens", np.array([num_output_tokens], dtype=np.int32)),
    ])


class _Outbox:
    """One thread that sends every response, so the engine thread never waits on Triton's IPC. When it falls
    behind, it merges a request's queued deltas into one response (fewer messages under load; no added
    latency when it keeps up)."""

    def __init__(self, after_sending):
        self.after_sending = after_sending  # called once the outbox has sent what it had (metrics)
        self.queue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="language-outbox", daemon=True)
        self.thread.start()

    def _run(self):
        running = True
        while running:
            batch = [self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get())
            pending: dict = {}  # sender -> its merged output, in arrival order
            for item in batch:
                if item is None:
                    running = False
                    continue
                sender, out = item
                pending[sender] = _merge(pending[sender], out) if sender in pending else out
            for sender, out in pending.items():
                sender.send(out)
            self.after_sending()

    def close(self):
        self.queue.put(None)
        self.thread.join(timeout=30)


def _merge(first: StepOutput, then: StepOutput) -> StepOutput:
    return StepOutput(first.token_ids + then.token_ids, first.text + then.text, then.finish_reason, then.error)


class _Sender:
    """Sends one request's engine outputs (through the outbox thread)."""

    CANCEL_CHECK_S = 0.1  # is_cancelled() is a round trip to the server: ask at most this often

    def __init__(self, engine, outbox, metrics, request_id, sender, stream, num_input_tokens, arrival_s):
        self.engine, self.outbox, self.request_id, self.sender, self.stream = engine, outbox, request_id, sender, stream
        self.metrics, self.arrival_s = metrics, arrival_s
        self.num_input_tokens = num_input_tokens
        self.ids, self.text = [], []
        self.checked = time.monotonic()

    def __call__(self, out: StepOutput):  # on the engine thread
        self.outbox.queue.put((self, out))

    def send(self, out: StepOutput):
        if out.finished:  # an error's finish_reason is "error"
            self.metrics.ended(out.finish_reason)
        if out.token_ids and not self.ids:
            self.metrics.first_token(self.arrival_s)
        try:
            if out.error is not None:
                self.sender.send(triton_io.error_response(out.error, "language_model"), flags=triton_io.FINAL)
            else:
                self.ids += out.token_ids
                if self.stream:
                    self.sender.send(_response(out.token_ids, out.text, out.finish_reason, self.num_input_tokens,
                                               len(self.ids)), flags=triton_io.FINAL if out.finished else 0)
                else:
                    self.text.append(out.text)
                    if out.finished:
                        self.sender.send(_response(self.ids, "".join(self.text), out.finish_reason,
                                                   self.num_input_tokens, len(self.ids)), flags=triton_io.FINAL)
            if not out.finished and time.monotonic() - self.checked > self.CANCEL_CHECK_S:
                self.checked = time.monotonic()
                if self.sender.is_cancelled():
                    self.engine.abort(self.request_id)
        except Exception:  # the client is gone: stop generating for it
            self.engine.abort(self.request_id)


class TritonPythonModel:
    def initialize(self, args):
        self.supervisor = triton_io.supervise()  # heals dead stubs, exits if the server dies
        config = LanguageConfig.from_parameters(triton_io.parameters(args), device=triton_io.device(args))
        self.engine = LanguageEngine(config)
        self.metrics = metrics.EngineMetrics()
        self.outbox = _Outbox(lambda: self.metrics.publish(self.engine.stats()))

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
                    _Sender(self.engine, self.outbox, self.metrics, request_id, sender, sampling.stream,
                            len(arrays[I.INPUT_IDS]), sampling.arrival_s or arrival_s),
                )
            except Exception as e:
                sender.send(triton_io.error_response(e, "language_model"), flags=triton_io.FINAL)
        return None

    def finalize(self):
        self.supervisor.stop()
        self.engine.shutdown()
        self.outbox.close()
