"""E/P/D, the decode server: where each prompt is prefilled, on a prefill server or here.

A request leaves `submit` at once; a worker thread asks the engine how much of the prompt it has cached
(`cached_prefix`), and, unless fewer than `local_below` tokens are left (SGLang's adaptive PD: a short
prompt costs more to ship than to compute), asks a prefill server for the KV of the rest
(`remote_prefill.py`). The request then goes to the engine with that hand-off, which it decodes from; or
without one, when every prefill server failed, and the engine prefills it here. Nothing is lost: a
prefill server's failure only moves the prefill. Only the request's own fault fails it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ..errors import InvalidRequest
from .remote_prefill import RemotePrefill
from .sequence import Callback, LanguageRequest, Sequence, StepOutput

if TYPE_CHECKING:
    from .language import LanguageEngine

log = logging.getLogger(__name__)


class PrefillRouter:
    def __init__(self, engine: LanguageEngine, remote: RemotePrefill, local_below: int = 0, workers: int = 64,
                 on_route: Callable[[str], None] = lambda where: None) -> None:
        self.engine, self.remote, self.local_below, self.on_route = engine, remote, local_below, on_route
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="prefill-router")

    def submit(self, request: LanguageRequest, callback: Callback,
               attach: Callable[[Sequence | None], None]) -> None:
        """Route a request; `attach` gets the engine's handle (None if refused) once the engine has it."""
        self._pool.submit(self._route, request, callback, attach)

    def _route(self, request: LanguageRequest, callback: Callback, attach: Callable[[Sequence | None], None]) -> None:
        kv = None
        try:
            kv_from = self.engine.cached_prefix(request)
            if len(request.input_ids) - kv_from >= max(1, self.local_below):
                kv = self.remote(request, kv_from)
        except InvalidRequest as e:
            callback(StepOutput([], "", "error", e))
            attach(None)
            return
        except Exception:
            log.exception("routing the prefill of %s failed; prefilling it here", request.request_id)
        self.on_route("remote" if kv is not None else "local")
        attach(self.engine.submit(dataclasses.replace(request, prefilled=kv) if kv is not None else request,
                                  callback))

    def shutdown(self) -> None:
        """Let the requests being routed reach the engine (a prefill server's answer or its timeout)."""
        self._pool.shutdown(wait=True)
