"""`medlora serve` as one call: `serve(ServeOptions(...))`.

`ServeOptions` holds everything the command is told (the model, the engine, where to listen, the
request limits and the safety texts); `serve` loads the engine once and runs the HTTP app
(serve/app.py) under uvicorn until interrupted, or, for `engine="vllm"`, runs `vllm serve` with the
run's LoRA and chat template (`vllm_command`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlora.errors import ConfigError
from medlora.serve.app import Limits, create_app
from medlora.serve.loader import Served, build_engine, model_id
from medlora.serve.safety import DEFAULT_DISCLAIMER, Safety

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM accepts for --max-lora-rank


@dataclass(frozen=True)
class ServeOptions:
    """What `medlora serve` is told; the defaults are the command's."""

    spec: str  # base model: alias, folder, .gguf or Hub id
    adapter: Path | None = None  # run directory with the adapter
    engine: str = "auto"  # auto | transformers | llama.cpp | vllm
    with_base: bool = True  # also serve the untouched base, side by side
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # required as Bearer KEY on /v1 when set
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 512  # the most a request may ask for
    max_body_kb: int = 256
    max_queue: int = 64  # waiting requests before 429
    max_batch: int = 8  # requests per batch
    timeout_s: float = 120.0  # seconds before a request gets 504
    threads: int | None = None  # CPU threads (None: OMP_NUM_THREADS, else physical cores)
    gguf_type: str = "q8_0"  # llama.cpp weights
    log_prompts: bool = False
    disclaimer: str | None = None  # None: the default disclaimer
    no_disclaimer: bool = False
    emergency_notices: bool = True

    @property
    def n_ctx(self) -> int:
        """The context an engine needs: the longest prompt plus the longest answer."""
        return self.max_prompt_tokens + self.max_new_tokens

    def safety(self) -> Safety:
        return Safety(
            disclaimer=None if self.no_disclaimer else (self.disclaimer or DEFAULT_DISCLAIMER),
            emergency_notices=self.emergency_notices,
        )

    def limits(self, served: Served) -> Limits:
        """The app's limits; a request that names no length gets the run's `max_new_tokens`."""
        return Limits(
            api_key=self.api_key,
            max_prompt_tokens=self.max_prompt_tokens,
            max_new_tokens=self.max_new_tokens,
            default_max_tokens=min(served.generation.max_new_tokens, self.max_new_tokens),
            max_body_bytes=self.max_body_kb * 1024,
            max_queue=self.max_queue,
            request_timeout_s=self.timeout_s,
            log_prompts=self.log_prompts,
            safety=self.safety(),
        )


def load_served(options: ServeOptions) -> Served:
    """The engine and model ids for `options` (transformers or llama.cpp)."""
    return build_engine(
        options.spec,
        options.adapter,
        engine=options.engine,
        with_base=options.with_base,
        max_batch=options.max_batch,
        threads=options.threads,
        n_ctx=options.n_ctx,
        gguf_type=options.gguf_type,
    )


def vllm_command(options: ServeOptions) -> list[str]:
    """The `vllm serve` command line for GPU users: the base + the run's LoRA under the run's name."""
    import importlib.util

    import torch

    from medlora.models import local_folder

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("--engine vllm needs vLLM and a CUDA GPU: pip install vllm")
    if not torch.cuda.is_available():
        raise ConfigError("--engine vllm needs a CUDA GPU and none is visible; use --engine auto")
    if shutil.which("vllm") is None:
        raise ConfigError(
            "--engine vllm runs the `vllm` command, which is not on PATH: pip install vllm "
            "into the environment medlora runs in"
        )
    spec, host, port = options.spec, options.host, options.port
    command = ["vllm", "serve", local_folder(spec), "--host", host, "--port", str(port)]
    command += ["--served-model-name", model_id(spec)]
    command += ["--max-model-len", str(options.n_ctx)]
    if options.adapter:
        run = Path(options.adapter)
        command += ["--enable-lora", "--lora-modules", f"{run.resolve().name}={run.resolve()}"]
        from medlora.export import check_run

        check_run(run)
        rank = int(
            json.loads((run / "adapter_config.json").read_text(encoding="utf-8")).get("r", 8)
        )
        command += ["--max-lora-rank", str(next((r for r in LORA_RANKS if r >= rank), rank))]
        if (run / "chat_template.jinja").is_file():
            command += ["--chat-template", str(run.resolve() / "chat_template.jinja")]
    if options.api_key:
        command += ["--api-key", options.api_key]
    return command


def serve(options: ServeOptions, console: Any = None) -> int:
    """Serve until interrupted; returns the exit status (vLLM's, for `engine="vllm"`)."""
    import logging

    from rich.console import Console

    console = console or Console()
    if options.engine == "vllm":
        import subprocess

        command = vllm_command(options)
        hidden = " ".join(c if c != options.api_key else "***" for c in command)
        console.print(f"starting: {hidden}", highlight=False)
        return subprocess.call(command)
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with console.status("loading…"):
        served = load_served(options)
    console.print(
        f"serving {', '.join(served.engine.models)} with {served.engine.name} on "
        f"http://{options.host}:{options.port} "
        f"(chat page at /, API at /v1{', key required' if options.api_key else ''})"
    )
    app = create_app(served, options.limits(served))
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning")
    return 0
