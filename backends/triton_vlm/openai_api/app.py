"""The FastAPI app: OpenAI routes over `Upstream`. A request's own fault is an HTTP 400 even when it
streams: the response headers wait for `vlm`'s first answer, a token or an error."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .format import DONE, Reply, event
from .parse import APIError, chat_call, completion_call, parse_json
from .upstream import Delta, Upstream

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(triton_url: str, served_model_name: str | None = None, max_body_mb: int = 256) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.upstream = Upstream(triton_url)  # one channel for every request, made on the server's loop
        yield
        await app.state.upstream.close()

    app = FastAPI(title="triton-vlm OpenAI API", lifespan=lifespan)
    names: list[str] = [served_model_name] if served_model_name else []

    async def model_name(upstream: Upstream) -> str:
        if not names:  # the language model's folder, as vLLM names a model by its path
            names.append(await upstream.model_path() or "vlm")
        return names[0]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/health")
    async def health(request: Request) -> Response:
        return Response(status_code=200 if await request.app.state.upstream.ready() else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        upstream = request.app.state.upstream
        if not await upstream.ready():
            raise APIError("the server is not ready", 503, "service_unavailable")
        return {"object": "list", "data": [{"id": await model_name(upstream), "object": "model",
                                            "created": int(time.time()), "owned_by": "triton-vlm"}]}

    async def answer(request: Request, chat: bool) -> Response:
        upstream = request.app.state.upstream
        body = parse_json(await _read_body(request, max_body_mb * 2**20))
        call = chat_call(body) if chat else completion_call(body)
        served = await model_name(upstream)
        if call.model and not serves(served, call.model):
            raise APIError(f"The model `{call.model}` does not exist; this server serves `{served}`", 404,
                           "NotFoundError", "model")
        reply = Reply(call.model or served, chat, call.include_usage, call.continuous_usage)
        deltas = upstream.generate(call.tensors, reply.id)
        try:
            first = await anext(deltas)
        except APIError as e:
            await deltas.aclose()
            if e.status == 500 and not await upstream.ready():
                raise APIError("the server is not ready", 503, "service_unavailable") from None
            raise
        except BaseException:
            await deltas.aclose()
            raise
        if call.stream:
            return StreamingResponse(_events(reply, first, deltas), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        async with contextlib.aclosing(deltas):
            return JSONResponse(reply.whole([first] + [d async for d in deltas]))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await answer(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await answer(request, chat=False)

    return app


def serves(served: str, requested: str) -> bool:
    """Whether `requested` names the served model (vLLM answers 404 to any other): its name, or when that is
    a folder, the same path written another way, or the folder's own name."""
    if requested == served:
        return True
    if "/" not in served:
        return False
    folder = os.path.normpath(served)
    return os.path.normpath(requested) == folder or requested == os.path.basename(folder)


async def _events(reply: Reply, first: Delta, deltas: AsyncIterator[Delta]) -> AsyncIterator[str]:
    """The SSE stream. A client that disconnects closes this generator, which cancels its Triton request."""
    async with contextlib.aclosing(deltas):
        last = first
        yield reply.chunk(first, first=True)
        try:
            async for last in deltas:
                yield reply.chunk(last, first=False)
        except APIError as e:  # after the headers went out: the error is the stream's last event
            yield event(e.body())
            yield DONE
            return
        if reply.include_usage:
            yield reply.usage_chunk(last)
        yield DONE


async def _read_body(request: Request, limit: int) -> bytes:
    if int(request.headers.get("content-length") or 0) > limit:
        raise APIError(f"the request body is over {limit // 2**20} MiB", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(f"the request body is over {limit // 2**20} MiB", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def run(triton_url: str, host: str, port: int, served_model_name: str | None = None, max_body_mb: int = 256,
        head_timeout_s: float = 10, body_timeout_s: float = 60) -> None:
    import uvicorn

    from .deadlines import with_deadlines

    uvicorn.run(create_app(triton_url, served_model_name, max_body_mb), host=host, port=port, log_level="warning",
                http=with_deadlines(head_timeout_s, body_timeout_s))
