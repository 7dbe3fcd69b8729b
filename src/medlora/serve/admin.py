"""The served models and the adapter admin, with vLLM's routes and bodies.

    GET  /v1/models               the base and every adapter (`parent`: the base, as vLLM lists them)
    POST /v1/load_lora_adapter    {"lora_name": NAME, "lora_path": PATH}
    POST /v1/unload_lora_adapter  {"lora_name": NAME}

All need the API key; the adapter routes also need `--allow-adapter-updates`, and PATH must lie
under `--adapter-root` (symlinks resolved) and pass `check_adapter_dir`. Slow preparation (llama.cpp:
the GGUF LoRA conversion) runs off the engine's thread; the load itself runs in it between decode
steps (llama.cpp: between requests), so requests in flight continue undisturbed. Merged GGUFs
(`--llama-cpp-adapters merged`) are refused. An unloaded name stops being served at once; its
adapter is freed when its last running request has finished.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends

from medlora.serve.adapters import (
    AdapterError,
    AdapterHost,
    adapter_model,
    check_adapter_dir,
    check_name,
    resolve_under,
)
from medlora.serve.http import APIError, Server, ServerState, require_key
from medlora.serve.schemas import LoadAdapter, UnloadAdapter

UNLOAD_POLL_S = 0.05
router = APIRouter(dependencies=[Depends(require_key)])


@router.get("/v1/models")
async def list_models(server: Server) -> dict[str, Any]:
    served = server.served
    rows = [
        {
            "id": name,
            "object": "model",
            "created": server.created,
            "owned_by": "medlora",
            "root": str(model.run) if model.run else served.base_id,
            "parent": model.parent,
            "role": "fine-tuned" if model.is_adapter else "base",
        }
        for name, model in served.models.items()
    ]
    return {"object": "list", "data": rows}


def updates_allowed(server: ServerState) -> tuple[AdapterHost, Path]:
    """Where adapters go and come from; 403 unless the server was started to allow updates."""
    root, host = server.limits.adapter_root, server.served.adapter_host
    if not server.limits.allow_adapter_updates or root is None:
        raise APIError(
            403,
            "adapter updates are off: start the server with --allow-adapter-updates "
            "--adapter-root DIR",
            "adapter_updates_disabled",
        )
    if host is None:
        raise APIError(
            400,
            f"hot loading needs the transformers engine or llama.cpp with GGUF LoRAs; this server "
            f"runs {server.served.engine.name} with merged GGUFs (--llama-cpp-adapters merged)",
            "unsupported_engine",
        )
    return host, root


@router.post("/v1/load_lora_adapter")
async def load_adapter(body: LoadAdapter, server: Server) -> dict[str, Any]:
    host, root = updates_allowed(server)
    served = server.served
    async with server.adapter_lock:
        try:
            name = check_name(body.lora_name)
            if name in served.models:
                raise AdapterError(
                    f"'{name}' is served already; unload it first or choose another name",
                    "adapter_exists",
                )
            folder = resolve_under(root, body.lora_path)
            base = await asyncio.to_thread(lambda: host.base)
            check_adapter_dir(folder, max_rank=served.max_lora_rank, base_model=base)
            known = list({id(m.tokenizer): m.tokenizer for m in served.models.values()}.values())
            entry = await asyncio.to_thread(
                adapter_model, name, folder, served.base_id, known, served.tokenizer
            )
            prepared = await asyncio.to_thread(host.prepare, folder)  # e.g. GGUF conversion
            await asyncio.wrap_future(server.scheduler.call(lambda: host.load(name, prepared)))
        except AdapterError as error:
            raise APIError(error.status, str(error), error.code) from None
        served.models[name] = entry
    return {"object": "lora_adapter", "id": name, "parent": served.base_id, "loaded": True}


@router.post("/v1/unload_lora_adapter")
async def unload_adapter(body: UnloadAdapter, server: Server) -> dict[str, Any]:
    host, _ = updates_allowed(server)
    served = server.served
    async with server.adapter_lock:
        entry = served.models.get(body.lora_name)
        if entry is None or not entry.is_adapter:
            kind = "the base model cannot be unloaded" if entry else "no such adapter"
            raise APIError(
                404 if entry is None else 400,
                f"'{body.lora_name}': {kind}; adapters served: {served.adapters}",
                "adapter_not_found" if entry is None else "invalid_request",
            )
        del served.models[body.lora_name]  # new requests for it get 404 from now on
        in_use = getattr(served.engine, "in_use", lambda adapter: False)
        while in_use(entry.adapter) or server.scheduler.waiting_for(entry.id):
            await asyncio.sleep(UNLOAD_POLL_S)
        await asyncio.wrap_future(server.scheduler.call(lambda: host.unload(entry.adapter)))
    if served.default_model == entry.id:
        served.default_model = next(iter(served.models), served.base_id)
    return {"object": "lora_adapter", "id": entry.id, "loaded": False}
