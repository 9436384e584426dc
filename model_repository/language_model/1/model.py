"""language_model (decoupled): _INPUT_IDS, _IMAGE_EMBEDS, _IMAGE_LAYOUT, _SAMPLING, optional _IMAGE_KEYS ->
text_output, output_ids, finish_reason, num_input_tokens, num_output_tokens (so far). Streaming: one
response per new token (deltas), the last one FINAL with the finish_reason. Otherwise one FINAL response
with everything. Errors: an error response, then FINAL. `cancel_request_id` alone: that request ends
("cancelled"); this one gets only FINAL.
E/P/D: with _KV_FROM, a decode server's request: prefill only, one FINAL answer with the prompt's KV from
that token on (_KV, _KV_META) and the first token. With `prefill_urls` (a decode server), each prompt is
prefilled on a prefill server, or here (`engine/prefill_router.py`)."""

import json
import time
import uuid
from dataclasses import replace

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_vlm import interface as I
from triton_vlm.config import LanguageConfig
from triton_vlm.engine.kv_nixl import NixlTransport
from triton_vlm.engine.prefill_router import PrefillRouter
from triton_vlm.engine.remote_prefill import RemotePrefill
from triton_vlm.engine.sequence import LanguageRequest
from triton_vlm.errors import InvalidRequest, Unavailable
from triton_vlm.protocol import SamplingParams
from triton_vlm.serving import metrics, triton_io
from triton_vlm.serving.cuda_copies import CopyTrace
from triton_vlm.serving.engine_process import EngineProcess
from triton_vlm.serving.responses import InFlight, Outbox, ResponseStream


class TritonPythonModel:
    def initialize(self, args):
        self.supervisor = triton_io.supervise()  # heals dead stubs, exits if the server dies
        self.copies = CopyTrace("language_model")  # with TRITON_VLM_CUDA_COPY_TRACE only (the GPU check)
        config = LanguageConfig.from_parameters(triton_io.parameters(args), device=triton_io.device(args))
        self.engine = EngineProcess(config)  # the model runs in a child process: its death loses no stream
        self.metrics = metrics.EngineMetrics()
        self.outbox = Outbox(lambda: self.metrics.publish(self.engine.stats()))
        self.in_flight = InFlight()
        self.router = self.remote_metrics = None
        decode = bool(config.remote_prefills or config.prefill_urls_file)  # a decode server (E/P/D)
        self.nixl = None
        if config.kv_transport == "nixl":  # fails here if NIXL cannot start; a decode server's pool: its cache's size
            self.nixl = NixlTransport(self.engine.kv_bytes_per_token * self.engine.num_blocks * self.engine.block_size
                                      if decode else 0)
        if decode:
            remote = RemotePrefill(config.remote_prefills, config.prefill_timeout_s,
                                   on_transfer=self.metrics.kv_transferred, nixl=self.nixl,
                                   kv_bytes_per_token=self.engine.kv_bytes_per_token)
            remote.start(config.prefill_urls_file, pb_utils.Logger.log_warn, pb_utils.Logger.log_info, "prefill",
                         "its prompts are prefilled on the others, or here")
            self.remote_metrics = metrics.RemoteServerMetrics("prefill", remote.state)
            self.router = PrefillRouter(self.engine, remote, config.local_prefill_below,
                                        on_route=self.metrics.prefilled_at)

    def execute(self, requests):
        arrival_s = time.time()  # when preprocess did not say (a caller of this model itself)
        for request in requests:
            sender = request.get_response_sender()
            try:
                arrays = triton_io.inputs(request, [I.INPUT_IDS, I.IMAGE_LAYOUT, I.SAMPLING, I.IMAGE_KEYS, I.CANCEL,
                                                    I.KV_FROM, I.KV_TARGET])
                if I.CANCEL in arrays:  # a control request: end that request (if it runs), answer nothing
                    self.in_flight.cancel(bytes(arrays[I.CANCEL].reshape(-1)[0]).decode(errors="replace"))
                    sender.send(flags=triton_io.FINAL)
                    continue
                prompt = [I.INPUT_IDS, I.IMAGE_LAYOUT, I.SAMPLING]
                if any(name not in arrays for name in prompt) or \
                        pb_utils.get_input_tensor_by_name(request, I.IMAGE_EMBEDS) is None:
                    raise InvalidRequest("language_model takes _INPUT_IDS, _IMAGE_EMBEDS, _IMAGE_LAYOUT and "
                                         "_SAMPLING (and _IMAGE_KEYS), or cancel_request_id alone")
                sampling = SamplingParams.from_json(arrays[I.SAMPLING].reshape(-1)[0]).validate()
                keys = tuple(bytes(k) for k in arrays.get(I.IMAGE_KEYS, np.zeros(0, np.object_)))
                embeds = triton_io.input_tensor(request, I.IMAGE_EMBEDS)
                self.metrics.embeds_received(embeds.is_cuda)
                language_request = LanguageRequest(request.request_id() or uuid.uuid4().hex, arrays[I.INPUT_IDS],
                                                   embeds, arrays[I.IMAGE_LAYOUT], sampling, keys)
                prefill_only = I.KV_FROM in arrays  # a decode server's request: answer with the KV
                wire = triton_io.LanguageWire
                if prefill_only:
                    language_request = replace(language_request, prefill_only=True,
                                               kv_from=int(arrays[I.KV_FROM].reshape(-1)[0]))
                    if I.KV_TARGET in arrays:  # ... written into the decode server's memory
                        if self.nixl is None:
                            raise Unavailable("this server's kv_transport is grpc: it cannot write KV with NIXL")
                        wire = triton_io.NixlWire(self.nixl, json.loads(arrays[I.KV_TARGET].reshape(-1)[0]))
                stream = ResponseStream(self.outbox, wire, sender, language_request.request_id,
                                        sampling.stream and not prefill_only, len(arrays[I.INPUT_IDS]),
                                        sampling.arrival_s or arrival_s, self.metrics, self.in_flight)
                if self.router is not None and not prefill_only:
                    self.router.submit(language_request, stream, stream.attach)
                else:
                    stream.attach(self.engine.submit(language_request, stream))
            except Exception as e:
                sender.send(triton_io.error_response(e, "language_model"), flags=triton_io.FINAL)
        return None

    def finalize(self):
        self.supervisor.stop()
        if self.router is not None:
            self.router.shutdown()
            self.remote_metrics.stop()
        self.engine.shutdown()
        self.outbox.close()
        self.copies.stop()
