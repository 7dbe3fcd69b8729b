"""`medlora chat`, `generate` and `serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medlora.cli.app import (
    _quiet_libraries,
    app,
    console,
    user_errors,
)
from medlora.export.common import DEFAULT_GGUF_TYPE, GGUF_TYPE_HELP

EngineOption = Annotated[
    str,
    typer.Option(
        "--engine", help="auto (llama.cpp when installed) | transformers | llama.cpp | vllm."
    ),
]
MaxNewTokensOption = Annotated[
    int | None,
    typer.Option("--max-new-tokens", min=1, help="Default: the run's generation settings."),
]
AdapterOption = Annotated[
    Path | None, typer.Option("--adapter", "-a", help="Run directory with the adapter.")
]


@app.command("chat")
@user_errors
def chat_cmd(
    spec: Annotated[str, typer.Argument(help="Base model spec (alias, folder, .gguf, Hub id).")],
    adapter: AdapterOption = None,
    engine: EngineOption = "auto",
    max_new_tokens: MaxNewTokensOption = None,
) -> None:
    """Talk to the model in the terminal: streaming, multi-turn, /reset for a new conversation."""
    _quiet_libraries()
    from medlora.chat import Chat, chat_loop
    from medlora.serve.loader import build_engine

    with console.status("loading…"):
        served = build_engine(spec, adapter, engine=engine, with_base=False)
    chat_loop(Chat(served, max_new_tokens), console, read=console.input)


@app.command("generate")
@user_errors
def generate_cmd(
    spec: Annotated[str, typer.Argument(help="Base model spec (alias, folder, .gguf, Hub id).")],
    in_path: Annotated[
        Path, typer.Option("--in", help='JSONL with one {"question": ...} per line.')
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="JSONL to write, one answer per question.")
    ],
    adapter: AdapterOption = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    max_new_tokens: MaxNewTokensOption = None,
) -> None:
    """Answer a file of questions in batches (greedy, merged weights, the run's chat template)."""
    _quiet_libraries()
    from medlora.chat import generate_file

    with console.status("answering…") as status:
        rows = generate_file(
            spec,
            adapter,
            in_path,
            out,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            log=lambda line: status.update(f"answering… {line}"),
        )
    console.print(f"wrote {len(rows)} answers to {out}")


ServeAdapterOption = Annotated[
    list[str],
    typer.Option(
        "--adapter",
        "-a",
        help="[NAME=]RUN_DIR, repeatable: each adapter is served under NAME (default: the "
        "folder's name), all on one base.",
    ),
]
BatchingOption = Annotated[
    str,
    typer.Option(
        "--batching",
        help="auto (continuous on transformers, one request at a time on llama.cpp) | "
        "continuous (requests join and leave between tokens; on llama.cpp with GGUF LoRAs an "
        "adapter's greedy answers then vary slightly with the traffic) | static.",
    ),
]
LlamaCppAdaptersOption = Annotated[
    str,
    typer.Option(
        "--llama-cpp-adapters",
        help="llama.cpp: lora = one base GGUF plus each adapter as a GGUF LoRA, chosen per "
        "request; merged = one merged GGUF per adapter.",
    ),
]
AllowAdapterUpdatesOption = Annotated[
    bool,
    typer.Option(
        "--allow-adapter-updates",
        help="Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (needs an API key "
        "and --adapter-root).",
    ),
]
VllmPythonOption = Annotated[
    str | None,
    typer.Option(
        "--vllm-python",
        envvar="MEDLORA_VLLM_PYTHON",
        help="--engine vllm: the Python whose environment has vLLM (`make vllm` builds one).",
    ),
]


@app.command("serve")
@user_errors
def serve_cmd(
    ctx: typer.Context,
    # Each parameter is named after its `ServeOptions` field: the command hands them on as they are.
    spec: Annotated[str, typer.Argument(help="Base model spec (alias, folder, .gguf, Hub id).")],
    adapters: ServeAdapterOption = (),  # type: ignore[assignment]
    host: str = "127.0.0.1",
    port: int = 8000,
    engine: EngineOption = "auto",
    batching: BatchingOption = "auto",
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="MEDLORA_API_KEY", help="Require Bearer KEY on /v1."),
    ] = None,
    with_base: Annotated[
        bool, typer.Option("--base/--no-base", help="Also serve the base model (side by side).")
    ] = True,
    max_prompt_tokens: Annotated[int, typer.Option(min=1)] = 1024,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most a request may ask.")] = 512,
    max_body_kb: Annotated[int, typer.Option(min=1)] = 256,
    max_queue: Annotated[int, typer.Option(min=1, help="Waiting requests before 429.")] = 64,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests per batch.")] = 8,
    timeout_s: Annotated[
        float, typer.Option("--timeout", help="Seconds before a request gets 504.")
    ] = 120.0,
    threads: Annotated[
        int | None,
        typer.Option(help="CPU threads (default: OMP_NUM_THREADS, else physical cores)."),
    ] = None,
    gguf_type: Annotated[str, typer.Option(help=GGUF_TYPE_HELP)] = DEFAULT_GGUF_TYPE,
    llama_cpp_adapters: LlamaCppAdaptersOption = "lora",
    log_prompts: Annotated[
        bool, typer.Option("--log-prompts", help="Log prompts and answers.")
    ] = False,
    disclaimer: Annotated[str | None, typer.Option(help="Text added to every answer.")] = None,
    no_disclaimer: Annotated[bool, typer.Option("--no-disclaimer")] = False,
    emergency_notices: Annotated[
        bool,
        typer.Option(
            " /--no-emergency-notice", help="No emergency notice first.", show_default=False
        ),
    ] = True,
    allow_adapter_updates: AllowAdapterUpdatesOption = False,
    adapter_root: Annotated[
        Path | None, typer.Option(help="Hot-loaded adapters must lie under this folder.")
    ] = None,
    max_lora_rank: Annotated[
        int, typer.Option(min=1, help="Refuse adapters of a higher rank.")
    ] = 64,
    vllm_python: VllmPythonOption = None,
) -> None:
    """OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models), /health and a
    chat page at /; many adapters on one base, chosen per request by `model`."""
    _quiet_libraries()
    from medlora.serve.server import ServeOptions, serve

    options = ServeOptions(**{**ctx.params, "adapters": tuple(adapters)})
    status = serve(options, console)
    if status:
        raise typer.Exit(status)
