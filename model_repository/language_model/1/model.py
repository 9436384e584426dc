"""language_model (decoupled): _INPUT_IDS, _IMAGE_EMBEDS, _IMAGE_GRID_THW, _SAMPLING -> text_output,
output_ids, finish_reason. Streaming: one response per new token (deltas), the last one FINAL with the
finish_reason. Otherwise one FINAL response with everything. Errors: an error response, then FINAL."""

import queue
import threading
import time
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_vlm import interface as I
from triton_vlm import triton_io
from triton_vlm.config import LanguageConfig
from triton_vlm.language import LanguageEngine, LanguageRequest, StepOutput
from triton_vlm.protocol import SamplingParams


def _response(ids, text, finish_reason):
    return pb_utils.InferenceResponse([
        triton_io.text_tensor("text_output", text),
        triton_io.output("output_ids", np.asarray(ids, dtype=np.int64)),
        triton_io.text_tensor("finish_reason", finish_reason or ""),
    ])


class _Outbox:
    """One thread that sends every response, so the engine thread never waits on Triton's IPC. When it falls
    behind, it merges a request's queued deltas into one response (fewer messages under load; no added
    latency when it keeps up)."""

    def __init__(self):
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

    def close(self):
        self.queue.put(None)
        self.thread.join(timeout=30)


def _merge(first: StepOutput, then: StepOutput) -> StepOutput:
    return StepOutput(first.token_ids + then.token_ids, first.text + then.text, then.finish_reason, then.error)


class _Sender:
    """Sends one request's engine outputs (through the outbox thread)."""

    CANCEL_CHECK_S = 0.1  # is_cancelled() is a round trip to the server: ask at most this often

    def __init__(self, engine, outbox, request_id, sender, stream):
        self.engine, self.outbox, self.request_id, self.sender, self.stream = engine, outbox, request_id, sender, stream
        self.ids, self.text = [], []
        self.checked = time.monotonic()

    def __call__(self, out: StepOutput):  # on the engine thread
        self.outbox.queue.put((self, out))

    def send(self, out: StepOutput):
        try:
            if out.error is not None:
                self.sender.send(triton_io.error_response(out.error), flags=triton_io.FINAL)
            elif self.stream:
                flags = triton_io.FINAL if out.finished else 0
                self.sender.send(_response(out.token_ids, out.text, out.finish_reason), flags=flags)
            else:
                self.ids += out.token_ids
                self.text.append(out.text)
                if out.finished:
                    self.sender.send(_response(self.ids, "".join(self.text), out.finish_reason),
                                     flags=triton_io.FINAL)
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
        self.outbox = _Outbox()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                arrays = triton_io.inputs(request, [I.INPUT_IDS, I.IMAGE_GRID_THW, I.SAMPLING])
                sampling = SamplingParams.from_json(arrays[I.SAMPLING].reshape(-1)[0]).validate()
                request_id = request.request_id() or uuid.uuid4().hex
                self.engine.submit(
                    LanguageRequest(request_id, arrays[I.INPUT_IDS], triton_io.input_tensor(request, I.IMAGE_EMBEDS),
                                    arrays[I.IMAGE_GRID_THW], sampling),
                    _Sender(self.engine, self.outbox, request_id, sender, sampling.stream),
                )
            except Exception as e:
                sender.send(triton_io.error_response(e), flags=triton_io.FINAL)
        return None

    def finalize(self):
        self.supervisor.stop()
        self.engine.shutdown()
        self.outbox.close()
