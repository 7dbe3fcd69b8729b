"""The HTTP server: one FastAPI app over the engine, put together from a router per concern.

    POST /v1/chat/completions, /v1/completions   OpenAI's generation routes (serve/completions.py)
    GET  /v1/models, POST /v1/load_lora_adapter, /v1/unload_lora_adapter   (serve/admin.py)
    GET  /health                engine, queue depth, memory; never needs the API key
    GET  /                      the chat page (page.html)

Every route answers errors in OpenAI's shape; the body limit (413) holds for all, the API key (401)
for /v1. Every router reads the shared `ServerState` (serve/http.py) from `app.state.server`, so each one
works mounted alone on a bare app that holds one.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse

from medlora.serve import admin, completions
from medlora.serve.http import BodyLimit, Limits, Server, ServerState, add_error_handlers
from medlora.serve.loader import Served

PAGE = Path(__file__).with_name("page.html")
health_router = APIRouter()
page_router = APIRouter()


def rss_mb() -> float | None:
    """Resident memory of this process (Linux), for /health and the load test's memory figures."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


@health_router.get("/health")
async def health(server: Server) -> dict[str, Any]:
    served = server.served
    return {
        "status": "ok",
        "engine": served.engine.name,
        "batching": served.engine.batching,
        "models": list(served.models),
        "default_model": served.default_model,
        "queued": server.scheduler.queued,
        "running": server.scheduler.running,
        "max_queue": server.limits.max_queue,
        "rss_mb": rss_mb(),
    }


@page_router.get("/", response_class=HTMLResponse)
async def page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


@asynccontextmanager
async def run_scheduler(app: FastAPI) -> AsyncIterator[None]:
    """The engine's worker thread runs while the app does."""
    scheduler = app.state.server.scheduler
    scheduler.start()
    yield
    scheduler.stop()


def create_app(served: Served, limits: Limits | None = None) -> FastAPI:
    app = FastAPI(title="medlora", lifespan=run_scheduler, docs_url=None, redoc_url=None)
    app.state.server = ServerState(served, limits or Limits())
    add_error_handlers(app)
    for router in (completions.router, admin.router, health_router, page_router):
        app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=app.state.server.limits.max_body_kb * 1024)
    return app
