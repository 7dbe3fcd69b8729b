"""HTTP plumbing shared by every route: OpenAI's error shape, the API key, the body size limit.

Every error the server answers, its own or the framework's (no such route, wrong method, a body that
is not JSON or not UTF-8, a schema violation), is `{"error": {"message", "type", "code", "param"}}`,
the shape OpenAI's clients parse.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


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
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = (
            f"{where}: {first.get('msg', 'invalid request')}"
            if where
            else first.get("msg", "invalid")
        )
        return JSONResponse(error_body(message, "invalid_request"), 422)


def check_api_key(request: Request, api_key: str | None) -> None:
    """401 unless the request carries `Authorization: Bearer KEY` (or `api-key: KEY`)."""
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
            error_body(
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
