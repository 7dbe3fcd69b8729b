"""What every route shares: the server's state, OpenAI's error shape, the API key, the body limit.

The state (`ServerState`: the served models, the limits, the queue) lives on `app.state.server`;
a route asks for it with a `server: Server` parameter, so a router works on any app that holds one.
Every error the server answers, its own or the framework's (no such route, wrong method, a body that
is not JSON or not UTF-8, a schema violation), is `{"error": {"message", "type", "code", "param"}}`,
the shape OpenAI's clients parse.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from medlora.serve.loader import Served
from medlora.serve.safety import DEFAULT_DISCLAIMER, Safety
from medlora.serve.scheduler import Scheduler


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What the server allows a request and adds to its answer. `medlora serve`'s options
    (`ServeOptions`) extend it, so each field is named after the command's option."""

    api_key: str | None = None  # required as `Bearer KEY` on /v1 when set
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 512  # the most a request may ask for
    default_max_tokens: int | None = None  # when a request does not say (None: the model's run's)
    max_body_kb: int = 256
    max_queue: int = 64  # waiting requests before 429
    timeout_s: float = 120.0  # seconds before a request gets 504
    log_prompts: bool = False
    disclaimer: str | None = None  # None: the default disclaimer
    no_disclaimer: bool = False
    emergency_notices: bool = True
    allow_adapter_updates: bool = False  # /v1/load_lora_adapter and /v1/unload_lora_adapter
    adapter_root: Path | None = None  # hot-loaded adapters come from under this folder only

    @property
    def safety(self) -> Safety:
        disclaimer = None if self.no_disclaimer else (self.disclaimer or DEFAULT_DISCLAIMER)
        return Safety(disclaimer, self.emergency_notices)


@dataclass
class ServerState:
    """What the routes share: the served models, the limits and the queue in front of the engine."""

    served: Served
    limits: Limits = field(default_factory=Limits)
    scheduler: Scheduler = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))  # /v1/models' `created`
    adapter_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # names are taken atomically

    def __post_init__(self) -> None:
        self.scheduler = Scheduler(self.served.engine, max_queue=self.limits.max_queue)


def server_state(request: Request) -> ServerState:
    return request.app.state.server


Server = Annotated[ServerState, Depends(server_state)]  # a route's `server: Server` parameter


class APIError(HTTPException):
    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code


def error_body(message: str, code: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # APIError carries its code; routing errors (404 no such route, 405 wrong method) and any
        # other HTTP error answer in OpenAI's shape too, which clients parse.
        fallback = {404: "not_found", 405: "method_not_allowed"}.get(
            error.status_code, "http_error"
        )
        code = getattr(error, "code", fallback)
        return JSONResponse(
            error_body(str(error.detail), code), error.status_code, headers=error.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = next(iter(error.errors()), {})
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = first.get("msg", "invalid request")
        message = f"{where}: {message}" if where else message
        return JSONResponse(error_body(message, "invalid_request"), 422)


def require_key(request: Request, server: Server) -> None:
    """401 unless the request carries `Authorization: Bearer KEY` (or `api-key: KEY`)."""
    api_key = server.limits.api_key
    if not api_key:
        return
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else request.headers.get("api-key", "")
    if not hmac.compare_digest(token.encode(), api_key.encode()):
        raise APIError(
            401, "missing or wrong API key (send Authorization: Bearer KEY)", "invalid_api_key"
        )


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
            await self._refuse(scope, receive, send)
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
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Any, receive: Any, send: Any) -> None:
        message = f"request body is over this server's limit of {self.max_bytes} bytes"
        await JSONResponse(error_body(message, "body_too_large"), 413)(scope, receive, send)
