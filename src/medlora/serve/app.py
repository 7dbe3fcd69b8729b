"""The HTTP server: OpenAI's chat-completions API, a health check and the chat page.

    POST /v1/chat/completions   OpenAI schema; `stream: true` answers as server-sent events
    GET  /v1/models             the served models (fine-tuned, and base when loaded)
    GET  /health                engine, queue depth, memory; never needs the API key
    GET  /                      the chat page (page.html)

Limits are enforced before any work is queued: body size (413), API key (401), request schema (422),
prompt tokens and max_tokens (400), queue full (429, with Retry-After), request timeout (504).
Prompts and answers are only logged with `log_prompts`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from medlora.serve.engine import Event, Job
from medlora.serve.loader import Served
from medlora.serve.prompt import conversation_ids, last_user_text
from medlora.serve.safety import Safety
from medlora.serve.scheduler import QueueFull, Scheduler

logger = logging.getLogger("medlora.serve")
PAGE = Path(__file__).with_name("page.html")


@dataclass
class Limits:
    api_key: str | None = None
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 512  # the most a request may ask for
    default_max_tokens: int = 256  # when a request does not say
    max_body_bytes: int = 256 * 1024
    max_queue: int = 64
    request_timeout_s: float = 120.0
    log_prompts: bool = False
    safety: Safety = field(default_factory=Safety)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _text_only(cls, value: str | list[dict[str, Any]]) -> str:
        if isinstance(value, str):
            return value
        parts = []
        for part in value:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The subset of OpenAI's request this server honours; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None


class APIError(HTTPException):
    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code


def _error_body(message: str, code: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}


class BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413, declared or streamed."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0
        too_big = False

        async def counting_receive() -> Any:
            nonlocal seen, too_big
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    too_big = True
                    raise APIError(413, "request body too large", "body_too_large")
            return message

        try:
            await self.app(scope, counting_receive, send)
        except APIError:
            if not too_big:
                raise
            await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps(
            _error_body(
                f"request body is over this server's limit of {self.max_bytes} bytes",
                "body_too_large",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _rss_mb() -> float | None:
    """Resident memory of this process (Linux), for /health and the load test's stability check."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    import os

    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def create_app(served: Served, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    scheduler = Scheduler(served.engine, max_queue=limits.max_queue)
    tokenizer = served.engine.tokenizer
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="medlora", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler = scheduler
    app.state.served = served
    app.state.limits = limits

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # APIError carries its code; routing errors (404 no such route, 405 wrong method) and any
        # other HTTP error answer in OpenAI's shape too, which clients parse.
        fallback = {404: "not_found", 405: "method_not_allowed"}.get(
            error.status_code, "http_error"
        )
        code = getattr(error, "code", fallback)
        return JSONResponse(
            _error_body(str(error.detail), code), error.status_code, headers=error.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = (
            f"{where}: {first.get('msg', 'invalid request')}"
            if where
            else first.get("msg", "invalid")
        )
        return JSONResponse(_error_body(message, "invalid_request"), 422)

    def require_key(request: Request) -> None:
        if not limits.api_key:
            return
        given = request.headers.get("authorization", "")
        token = (
            given[7:] if given.lower().startswith("bearer ") else request.headers.get("api-key", "")
        )
        if not hmac.compare_digest(token.encode(), limits.api_key.encode()):
            raise APIError(
                401, "missing or wrong API key (send Authorization: Bearer KEY)", "invalid_api_key"
            )

    def models() -> list[dict[str, Any]]:
        rows = []
        for name in served.engine.models:
            role = "fine-tuned" if name == served.tuned else "base"
            rows.append(
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "medlora",
                    "role": role,
                }
            )
        return rows

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "engine": served.engine.name,
            "models": served.engine.models,
            "default_model": served.default_model,
            "queued": scheduler.queued,
            "running": scheduler.running,
            "max_queue": limits.max_queue,
            "rss_mb": _rss_mb(),
        }

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": models()}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    def prepare(body: ChatRequest) -> tuple[Job, asyncio.Queue[Event], str]:
        name = body.model or served.default_model
        if name not in served.engine.models:
            raise APIError(
                404,
                f"model '{name}' is not served here; use one of {served.engine.models}",
                "model_not_found",
            )
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", "unsupported_parameter")
        if body.stop:
            raise APIError(
                400,
                "stop sequences are not supported; the answer stops at end of turn",
                "unsupported_parameter",
            )
        wanted = body.max_completion_tokens or body.max_tokens or limits.default_max_tokens
        if wanted > limits.max_new_tokens:
            raise APIError(
                400,
                f"max_tokens {wanted} is over this server's limit of {limits.max_new_tokens}",
                "max_tokens_too_large",
            )
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": str(m.content)}
            for m in body.messages
        ]
        if not any(m["role"] == "user" for m in messages):
            raise APIError(400, "messages need at least one user message", "invalid_request")
        ids = conversation_ids(tokenizer, messages, served.system_prompt)
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt is {len(ids)} tokens, over this server's limit of {limits.max_prompt_tokens}",
                "context_length_exceeded",
            )
        sampling = served.sampling(
            wanted, temperature=body.temperature or 0.0, top_p=body.top_p or 1.0, seed=body.seed
        )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server shutting down): stop generating
                job.cancel()

        job = Job(name, ids, sampling, sink=sink)
        try:
            scheduler.submit(job)
        except QueueFull as full:
            raise APIError(
                429,
                f"server busy: {full}; retry shortly",
                "rate_limit_exceeded",
                {"Retry-After": "1"},
            ) from None
        return job, events, last_user_text(messages)

    def log(job: Job, messages: list[Message], text: str, started: float) -> None:
        logger.info(
            "request %s model=%s prompt_tokens=%d completion_tokens=%d finish=%s seconds=%.2f",
            job.id,
            job.model,
            len(job.prompt_ids),
            len(job.completion_ids),
            job.finish_reason,
            time.monotonic() - started,
        )
        if limits.log_prompts:
            logger.info(
                "request %s prompt=%s answer=%s",
                job.id,
                json.dumps([m.model_dump() for m in messages]),
                json.dumps(text),
            )

    def usage(job: Job) -> dict[str, int]:
        p, c = len(job.prompt_ids), len(job.completion_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(body: ChatRequest) -> Any:
        started = time.monotonic()
        job, events, user_text = prepare(body)
        prefix, suffix = limits.safety.prefix(user_text), limits.safety.suffix()
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        deadline = started + limits.request_timeout_s

        async def next_event() -> Event:
            return await asyncio.wait_for(
                events.get(), timeout=max(deadline - time.monotonic(), 0.001)
            )

        if not body.stream:
            try:
                while (event := await next_event()).kind == "token":
                    pass
            except TimeoutError:
                job.cancel()
                raise APIError(
                    504, f"no answer within {limits.request_timeout_s:g} s; retry later", "timeout"
                ) from None
            except asyncio.CancelledError:
                job.cancel()
                raise
            if event.kind == "error":
                raise APIError(500, event.text, "engine_error")
            content = prefix + job.text + suffix
            log(job, body.messages, content, started)
            return {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": job.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "length" if job.finish_reason == "length" else "stop",
                    }
                ],
                "usage": usage(job),
            }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            data = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": job.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def stream() -> AsyncIterator[str]:
            text = []
            try:
                yield chunk({"role": "assistant", "content": ""})
                if prefix:
                    yield chunk({"content": prefix})
                while True:
                    try:
                        event = await next_event()
                    except TimeoutError:
                        job.cancel()
                        error = _error_body(
                            f"no answer within {limits.request_timeout_s:g} s", "timeout"
                        )
                        yield f"data: {json.dumps(error)}\n\n"
                        break
                    if event.kind == "token":
                        text.append(event.text)
                        yield chunk({"content": event.text})
                        continue
                    if event.kind == "error":
                        yield f"data: {json.dumps(_error_body(event.text, 'engine_error', 'server_error'))}\n\n"
                        break
                    if suffix:
                        yield chunk({"content": suffix})
                    yield chunk({}, "length" if job.finish_reason == "length" else "stop")
                    if body.stream_options and body.stream_options.include_usage:
                        data = {
                            "id": completion_id,
                            "object": "chat.completion.chunk",
                            "created": int(time.time()),
                            "model": job.model,
                            "choices": [],
                            "usage": usage(job),
                        }
                        yield f"data: {json.dumps(data)}\n\n"
                    log(job, body.messages, prefix + "".join(text) + suffix, started)
                    break
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # a client that went away stops its generation at the next token

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    return app
