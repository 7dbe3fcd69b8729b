"""OpenAI's generation routes: check a request, queue it, answer whole or as server-sent events.

    POST /v1/chat/completions   chat (`stream: true` answers as server-sent events; `logprobs`)
    POST /v1/completions        a plain prompt, no chat template (legacy API; `logprobs: N`)

The request's `model` picks the base or an adapter. Limits are checked before any work is queued:
`n`, `stop`, `max_tokens` and prompt tokens (400), a full queue (429, with Retry-After); an answer
late past the request timeout is 504 (streamed: an error event). The safety texts wrap every answer.
Prompts and answers are only logged with `log_prompts`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from medlora.serve.adapters import ServedModel
from medlora.serve.engine import Engine, Event, Job, Sampling, TokenLogprob
from medlora.serve.http import APIError, Limits, Server, ServerState, error_body, require_key
from medlora.serve.loader import Served, sampling_for
from medlora.serve.openai_shape import (
    Reply,
    chat_chunk,
    chat_completion,
    completion_chunk,
    finish_reason,
    text_completion,
    usage,
)
from medlora.serve.prompt import conversation_ids, last_user_text
from medlora.serve.scheduler import QueueFull
from medlora.serve.schemas import ChatRequest, CompletionRequest, GenerationRequest

logger = logging.getLogger("medlora.serve")
router = APIRouter(dependencies=[Depends(require_key)])

# A stream piece: (text or None for the end, its tokens' log-probabilities, finish, offset) → JSON
Chunk = Callable[[str | None, list[TokenLogprob], str | None, int], dict[str, Any]]


class Answer:
    """A queued request: its job, the events the engine's thread sends it, the safety texts around
    it, and its deadline."""

    def __init__(
        self, model: ServedModel, ids: list[int], sampling: Sampling, question: str, limits: Limits
    ) -> None:
        self.job = Job(model.id, ids, sampling, sink=self._put, adapter=model.adapter)
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.prefix, self.suffix = limits.safety.prefix(question), limits.safety.suffix()
        self.limits = limits
        self.started = time.monotonic()

    def _put(self, event: Event) -> None:
        """The job's sink, called from the engine's thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down): stop generating
            self.job.cancel()

    @property
    def text(self) -> str:
        return self.prefix + self.job.text + self.suffix

    async def next_event(self) -> Event:
        left = self.started + self.limits.timeout_s - time.monotonic()
        return await asyncio.wait_for(self.events.get(), timeout=max(left, 0.001))

    async def whole(self) -> None:
        """Wait for the end of the answer; 504 past the deadline, 500 on an engine error."""
        try:
            while (event := await self.next_event()).kind == "token":
                pass
        except TimeoutError:
            self.job.cancel()
            raise APIError(
                504, f"no answer within {self.limits.timeout_s:g} s; retry later", "timeout"
            ) from None
        except asyncio.CancelledError:
            self.job.cancel()
            raise
        if event.kind == "error":
            raise APIError(500, event.text, "engine_error")

    def log(self, prompt: Any, text: str) -> None:
        job = self.job
        logger.info(
            "request %s model=%s prompt_tokens=%d completion_tokens=%d finish=%s seconds=%.2f",
            job.id,
            job.model,
            len(job.prompt_ids),
            len(job.completion_ids),
            job.finish_reason,
            time.monotonic() - self.started,
        )
        if self.limits.log_prompts:
            logger.info(
                "request %s prompt=%s answer=%s", job.id, json.dumps(prompt), json.dumps(text)
            )


def pick_model(served: Served, name: str | None) -> ServedModel:
    name = name or served.default_model
    if name not in served.models:
        raise APIError(
            404,
            f"model '{name}' is not served here; use one of {list(served.models)}",
            "model_not_found",
        )
    return served.models[name]


def max_tokens(
    limits: Limits, model: ServedModel, body: GenerationRequest, asked: int | None
) -> int:
    """The answer's length limit (unasked: the model's run's, within the server's); 400 for what
    this server cannot honour."""
    if body.n != 1:
        raise APIError(400, "only n=1 is supported", "unsupported_parameter")
    if body.stop:
        raise APIError(
            400,
            "stop sequences are not supported; the answer stops at end of turn",
            "unsupported_parameter",
        )
    if asked and asked > limits.max_new_tokens:
        raise APIError(
            400,
            f"max_tokens {asked} is over this server's limit of {limits.max_new_tokens}",
            "max_tokens_too_large",
        )
    unasked = limits.default_max_tokens or model.generation.max_new_tokens
    return asked or min(unasked, limits.max_new_tokens)


def check_logprobs(engine: Engine, top: int | None) -> None:
    if top is not None and not engine.supports_logprobs:
        raise APIError(
            400,
            f"logprobs need continuous batching on the transformers engine, or the llama.cpp "
            f"engine; this server runs {engine.name} ({engine.batching})",
            "unsupported_parameter",
        )


def submit(
    server: ServerState,
    body: GenerationRequest,
    model: ServedModel,
    ids: list[int],
    wanted: int,
    question: str,
    top_logprobs: int | None,
) -> Answer:
    """Queue the request; 400 for a prompt over the limit, 429 when the queue is full."""
    limits = server.limits
    if len(ids) > limits.max_prompt_tokens:
        raise APIError(
            400,
            f"the prompt is {len(ids)} tokens, over this server's limit of "
            f"{limits.max_prompt_tokens}",
            "context_length_exceeded",
        )
    temperature, top_p = body.temperature or 0.0, body.top_p or 1.0
    sampling = sampling_for(model, wanted, temperature, top_p, body.seed, top_logprobs)
    answer = Answer(model, ids, sampling, question, limits)
    try:
        server.scheduler.submit(answer.job)
    except QueueFull as full:
        raise APIError(
            429, f"server busy: {full}; retry shortly", "rate_limit_exceeded", {"Retry-After": "1"}
        ) from None
    return answer


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def sse_events(
    answer: Answer, chunk: Chunk, include_usage: bool, prompt: Any
) -> AsyncIterator[str]:
    """One event per text piece, the safety texts, the end (and usage when asked), then [DONE]."""
    job, pieces, sent = answer.job, [answer.prefix], len(answer.prefix)  # sent: characters so far
    try:
        yield sse(chunk("", [], None, 0))
        if answer.prefix:
            yield sse(chunk(answer.prefix, [], None, 0))
        while True:
            try:
                event = await answer.next_event()
            except TimeoutError:
                job.cancel()
                message = f"no answer within {answer.limits.timeout_s:g} s"
                yield sse(error_body(message, "timeout"))
                break
            if event.kind == "token":
                yield sse(chunk(event.text, event.logprobs, None, sent))
                pieces.append(event.text)
                sent += len(event.text)
                continue
            if event.kind == "error":
                yield sse(error_body(event.text, "engine_error", "server_error"))
                break
            if answer.suffix:
                yield sse(chunk(answer.suffix, [], None, sent))
            yield sse(chunk(None, [], finish_reason(job), sent))
            if include_usage:
                yield sse({**chunk(None, [], None, sent), "choices": [], "usage": usage(job)})
            answer.log(prompt, "".join(pieces) + answer.suffix)
            break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # a client that went away stops its generation at the next token


def stream(answer: Answer, chunk: Chunk, include_usage: bool, prompt: Any) -> StreamingResponse:
    return StreamingResponse(
        sse_events(answer, chunk, include_usage, prompt),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, server: Server) -> Any:
    model = pick_model(server.served, body.model)
    wanted = max_tokens(server.limits, model, body, body.max_completion_tokens or body.max_tokens)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "invalid_request")
    top = (body.top_logprobs or 0) if body.logprobs else None
    check_logprobs(server.served.engine, top)
    messages = body.chat_messages()
    if not any(m["role"] == "user" for m in messages):
        raise APIError(400, "messages need at least one user message", "invalid_request")
    ids = conversation_ids(model.tokenizer, messages, model.system_prompt)
    answer = submit(server, body, model, ids, wanted, last_user_text(messages), top)
    reply = Reply(f"chatcmpl-{uuid.uuid4().hex[:24]}", model.id, model.tokenizer, top)
    if body.stream:
        return stream(answer, partial(chat_chunk, reply), body.include_usage, messages)
    await answer.whole()
    answer.log(messages, answer.text)
    return chat_completion(reply, answer.text, answer.job)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, server: Server) -> Any:
    model = pick_model(server.served, body.model)
    wanted = max_tokens(server.limits, model, body, body.max_tokens)
    for unsupported in ("echo", "suffix"):
        if getattr(body, unsupported):
            raise APIError(400, f"{unsupported} is not supported", "unsupported_parameter")
    check_logprobs(server.served.engine, body.logprobs)
    prompt = str(body.prompt)
    ids = model.tokenizer(prompt)["input_ids"]
    if not ids:
        raise APIError(400, "prompt: empty after tokenization", "invalid_request")
    answer = submit(server, body, model, ids, wanted, prompt, body.logprobs)
    reply = Reply(f"cmpl-{uuid.uuid4().hex[:24]}", model.id, model.tokenizer, body.logprobs)
    if body.stream:
        return stream(answer, partial(completion_chunk, reply), body.include_usage, prompt)
    await answer.whole()
    answer.log(prompt, answer.text)
    return text_completion(reply, answer.text, answer.job, len(answer.prefix))
