"""The HTTP server: OpenAI's API over the engine, a health check and the chat page.

    POST /v1/chat/completions   chat (`stream: true` answers as server-sent events; `logprobs`)
    POST /v1/completions        a plain prompt, no chat template (legacy API; `logprobs: N`)
    GET  /v1/models             the base and every adapter (`parent`: the base, as vLLM lists them)
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter   hot load/unload (serve/admin.py)
    GET  /health                engine, queue depth, memory; never needs the API key
    GET  /                      the chat page (page.html)

The request's `model` picks the base or an adapter. Limits are enforced before any work is queued:
body size (413), API key (401), request schema (422), prompt tokens and max_tokens (400), queue full
(429, with Retry-After), request timeout (504). Prompts and answers are only logged with
`log_prompts`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from medlora.serve.adapters import ServedModel
from medlora.serve.admin import add_adapter_routes
from medlora.serve.engine import Event, Job
from medlora.serve.http import APIError, BodyLimit, add_error_handlers, check_api_key, error_body
from medlora.serve.loader import Served, sampling_for
from medlora.serve.openai_shape import chat_logprobs, completion_logprobs, finish_reason, usage
from medlora.serve.prompt import conversation_ids, last_user_text
from medlora.serve.safety import Safety
from medlora.serve.scheduler import QueueFull, Scheduler
from medlora.serve.schemas import ChatRequest, CompletionRequest, GenerationRequest

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
    allow_adapter_updates: bool = False  # /v1/load_lora_adapter and /v1/unload_lora_adapter
    adapter_root: Path | None = None  # hot-loaded adapters come from under this folder only


def _rss_mb() -> float | None:
    """Resident memory of this process (Linux), for /health and the load test's memory figures."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    import os

    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


@dataclass
class Answer:
    """A submitted job, the queue its events arrive on, and what the safety texts wrap it with."""

    job: Job
    events: asyncio.Queue[Event]
    model: ServedModel
    prefix: str
    suffix: str
    started: float
    deadline: float

    async def next_event(self) -> Event:
        return await asyncio.wait_for(
            self.events.get(), timeout=max(self.deadline - time.monotonic(), 0.001)
        )


def create_app(served: Served, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    scheduler = Scheduler(served.engine, max_queue=limits.max_queue)
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
    add_error_handlers(app)

    def require_key(request: Request) -> None:
        check_api_key(request, limits.api_key)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "engine": served.engine.name,
            "batching": served.engine.batching,
            "models": list(served.models),
            "default_model": served.default_model,
            "queued": scheduler.queued,
            "running": scheduler.running,
            "max_queue": limits.max_queue,
            "rss_mb": _rss_mb(),
        }

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def list_models() -> dict[str, Any]:
        rows = []
        for name, model in served.models.items():
            rows.append(
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "medlora",
                    "root": str(model.run) if model.run else served.base_id,
                    "parent": model.parent,
                    "role": "fine-tuned" if model.is_adapter else "base",
                }
            )
        return {"object": "list", "data": rows}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    def pick_model(name: str | None) -> ServedModel:
        name = name or served.default_model
        if name not in served.models:
            raise APIError(
                404,
                f"model '{name}' is not served here; use one of {list(served.models)}",
                "model_not_found",
            )
        return served.models[name]

    def check_common(body: GenerationRequest, max_tokens: int | None) -> int:
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", "unsupported_parameter")
        if body.stop:
            raise APIError(
                400,
                "stop sequences are not supported; the answer stops at end of turn",
                "unsupported_parameter",
            )
        wanted = max_tokens or limits.default_max_tokens
        if wanted > limits.max_new_tokens:
            raise APIError(
                400,
                f"max_tokens {wanted} is over this server's limit of {limits.max_new_tokens}",
                "max_tokens_too_large",
            )
        return wanted

    def check_logprobs(top: int | None) -> None:
        if top is not None and not served.engine.supports_logprobs:
            raise APIError(
                400,
                f"logprobs need continuous batching on the transformers engine, or the llama.cpp "
                f"engine; this server runs {served.engine.name} ({served.engine.batching})",
                "unsupported_parameter",
            )

    def submit(
        body: GenerationRequest,
        model: ServedModel,
        ids: list[int],
        wanted: int,
        question: str,
        top_logprobs: int | None,
    ) -> Answer:
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt is {len(ids)} tokens, over this server's limit of "
                f"{limits.max_prompt_tokens}",
                "context_length_exceeded",
            )
        sampling = sampling_for(
            model, wanted, body.temperature or 0.0, body.top_p or 1.0, body.seed, top_logprobs
        )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server shutting down): stop generating
                job.cancel()

        job = Job(model.id, ids, sampling, sink=sink, adapter=model.adapter)
        try:
            scheduler.submit(job)
        except QueueFull as full:
            raise APIError(
                429,
                f"server busy: {full}; retry shortly",
                "rate_limit_exceeded",
                {"Retry-After": "1"},
            ) from None
        started = time.monotonic()
        return Answer(
            job,
            events,
            model,
            limits.safety.prefix(question),
            limits.safety.suffix(),
            started,
            started + limits.request_timeout_s,
        )

    def log(answer: Answer, prompt: Any, text: str) -> None:
        job = answer.job
        logger.info(
            "request %s model=%s prompt_tokens=%d completion_tokens=%d finish=%s seconds=%.2f",
            job.id,
            job.model,
            len(job.prompt_ids),
            len(job.completion_ids),
            job.finish_reason,
            time.monotonic() - answer.started,
        )
        if limits.log_prompts:
            logger.info(
                "request %s prompt=%s answer=%s", job.id, json.dumps(prompt), json.dumps(text)
            )

    async def whole(answer: Answer) -> None:
        """Wait for the end of a non-streamed answer; 504 past the deadline, 500 on engine error."""
        try:
            while (event := await answer.next_event()).kind == "token":
                pass
        except TimeoutError:
            answer.job.cancel()
            raise APIError(
                504, f"no answer within {limits.request_timeout_s:g} s; retry later", "timeout"
            ) from None
        except asyncio.CancelledError:
            answer.job.cancel()
            raise
        if event.kind == "error":
            raise APIError(500, event.text, "engine_error")

    def stream(
        answer: Answer,
        chunk: Callable[[str | None, list[Any], str | None], dict[str, Any]],
        include_usage: bool,
        prompt: Any,
    ) -> StreamingResponse:
        """Server-sent events: one chunk per text piece, the safety texts, the end, [DONE]."""
        job = answer.job

        def sse(data: dict[str, Any]) -> str:
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            text = []
            try:
                yield sse(chunk("", [], None))
                if answer.prefix:
                    yield sse(chunk(answer.prefix, [], None))
                while True:
                    try:
                        event = await answer.next_event()
                    except TimeoutError:
                        job.cancel()
                        message = f"no answer within {limits.request_timeout_s:g} s"
                        yield sse(error_body(message, "timeout"))
                        break
                    if event.kind == "token":
                        text.append(event.text)
                        yield sse(chunk(event.text, event.logprobs, None))
                        continue
                    if event.kind == "error":
                        yield sse(error_body(event.text, "engine_error", "server_error"))
                        break
                    if answer.suffix:
                        yield sse(chunk(answer.suffix, [], None))
                    yield sse(chunk(None, [], finish_reason(job)))
                    if include_usage:
                        yield sse({**chunk(None, [], None), "choices": [], "usage": usage(job)})
                    log(answer, prompt, answer.prefix + "".join(text) + answer.suffix)
                    break
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # a client that went away stops its generation at the next token

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(body: ChatRequest) -> Any:
        model = pick_model(body.model)
        wanted = check_common(body, body.max_completion_tokens or body.max_tokens)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "invalid_request")
        top = (body.top_logprobs or 0) if body.logprobs else None
        check_logprobs(top)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": str(m.content)}
            for m in body.messages
        ]
        if not any(m["role"] == "user" for m in messages):
            raise APIError(400, "messages need at least one user message", "invalid_request")
        ids = conversation_ids(model.tokenizer, messages, model.system_prompt)
        answer = submit(body, model, ids, wanted, last_user_text(messages), top)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"

        def logprobs(entries: list[Any]) -> dict[str, Any] | None:
            return chat_logprobs(model.tokenizer, entries, top) if top is not None else None

        if not body.stream:
            await whole(answer)
            content = answer.prefix + answer.job.text + answer.suffix
            log(answer, messages, content)
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason(answer.job),
            }
            if top is not None:
                choice["logprobs"] = logprobs(answer.job.logprobs)
            return {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model.id,
                "choices": [choice],
                "usage": usage(answer.job),
            }

        def chunk(text: str | None, entries: list[Any], finish: str | None) -> dict[str, Any]:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if text == "" and not entries:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            if top is not None and entries:
                choice["logprobs"] = logprobs(entries)
            return {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model.id,
                "choices": [choice],
            }

        include = bool(body.stream_options and body.stream_options.include_usage)
        return stream(answer, chunk, include, messages)

    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def completions(body: CompletionRequest) -> Any:
        model = pick_model(body.model)
        wanted = check_common(body, body.max_tokens)
        for unsupported in ("echo", "suffix"):
            if getattr(body, unsupported):
                raise APIError(400, f"{unsupported} is not supported", "unsupported_parameter")
        top = body.logprobs
        check_logprobs(top)
        prompt = str(body.prompt)
        ids = model.tokenizer(prompt)["input_ids"]
        if not ids:
            raise APIError(400, "prompt: empty after tokenization", "invalid_request")
        answer = submit(body, model, ids, wanted, prompt, top)
        completion_id = f"cmpl-{uuid.uuid4().hex[:24]}"

        def shape(text: str, entries: list[Any], finish: str | None, offset: int) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "text_completion",
                "created": int(time.time()),
                "model": model.id,
                "choices": [
                    {
                        "index": 0,
                        "text": text,
                        "logprobs": (
                            completion_logprobs(model.tokenizer, entries, top, offset)
                            if top is not None
                            else None
                        ),
                        "finish_reason": finish,
                    }
                ],
            }

        if not body.stream:
            await whole(answer)
            text = answer.prefix + answer.job.text + answer.suffix
            log(answer, prompt, text)
            result = shape(text, answer.job.logprobs, finish_reason(answer.job), len(answer.prefix))
            return {**result, "usage": usage(answer.job)}

        sent = 0

        def chunk(text: str | None, entries: list[Any], finish: str | None) -> dict[str, Any]:
            nonlocal sent
            piece = shape(text or "", entries, finish, sent)
            sent += len(text or "")
            return piece

        include = bool(body.stream_options and body.stream_options.include_usage)
        return stream(answer, chunk, include, prompt)

    add_adapter_routes(app, served, scheduler, limits, require_key)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    return app
