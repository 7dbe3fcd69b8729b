"""`medlora serve` as a user starts it: a real process on 127.0.0.1, then the OpenAI client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from serve_support import train_tiny_run
from typer.testing import CliRunner

from medlora.cli import app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command_answers_the_openai_client(tmp_path: Path, tiny_model_dir: Path) -> None:
    run = train_tiny_run(tmp_path, tiny_model_dir)
    port = free_port()
    medlora = Path(sys.executable).with_name("medlora")
    env = {**os.environ, "MEDLORA_API_KEY": "k-123"}
    command = [
        str(medlora),
        "serve",
        str(tiny_model_dir),
        "--adapter",
        str(run),
        "--port",
        str(port),
        "--engine",
        "transformers",
        "--max-new-tokens",
        "64",
    ]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.3)
        assert health["engine"] == "transformers" and set(health["models"]) == {
            "run",
            tiny_model_dir.name,
        }
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="k-123", max_retries=0
        )
        reply = client.chat.completions.create(
            model="run", messages=[{"role": "user", "content": "What causes anemia?"}], max_tokens=8
        )
        assert (
            reply.choices[0].message.content and reply.usage and reply.usage.completion_tokens <= 8
        )
        with pytest.raises(openai.BadRequestError, match="limit of 64"):
            client.chat.completions.create(
                model="run", messages=[{"role": "user", "content": "hi"}], max_tokens=65
            )
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="bad", max_retries=0
            ).models.list()
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    output = process.stdout.read() if process.stdout else ""
    assert "What causes anemia?" not in output  # prompts are not logged by default
    assert "request" in output  # but each request is


def test_vllm_engine_without_vllm_is_one_line(tiny_model_dir: Path) -> None:
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    result = CliRunner().invoke(app, ["serve", str(tiny_model_dir), "--engine", "vllm"])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "vllm" in result.output.lower()


def test_vllm_command_serves_the_run_as_a_lora_module(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util
    import shutil

    import torch

    from medlora.serve.server import ServeOptions, vllm_command

    run = train_tiny_run(tmp_path, tiny_model_dir)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(  # as on a GPU machine with vLLM installed
        importlib.util,
        "find_spec",
        lambda name, *args: object() if name == "vllm" else real_find_spec(name, *args),
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    options = ServeOptions(str(tiny_model_dir), run, max_new_tokens=256, max_prompt_tokens=1024)
    command = vllm_command(options)

    def value(flag: str) -> str:
        return command[command.index(flag) + 1]

    assert command[:3] == ["vllm", "serve", str(tiny_model_dir)]
    assert "--enable-lora" in command
    assert value("--lora-modules") == f"{run.resolve().name}={run.resolve()}"
    assert value("--max-lora-rank") == "8"  # the run's r, rounded up to a rank vLLM accepts
    assert value("--chat-template") == str(run.resolve() / "chat_template.jinja")
    assert value("--max-model-len") == "1280"


def test_threads_default_to_physical_cores_capped_by_omp(monkeypatch: pytest.MonkeyPatch) -> None:
    from medlora.machine import default_threads, physical_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert 1 <= default_threads() == physical_cores() <= (os.cpu_count() or 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a shared machine's cap wins
    assert default_threads() == 1


def test_serve_command_hands_one_options_object(monkeypatch: pytest.MonkeyPatch) -> None:
    """`medlora serve` flags → one `ServeOptions`; its limits and safety are what the app enforces."""
    from medlora.config import GenerationConfig
    from medlora.serve import server
    from medlora.serve.loader import Served

    seen: list[server.ServeOptions] = []
    monkeypatch.setattr(server, "serve", lambda options, console=None: seen.append(options) or 0)
    args = ["serve", "base-model", "--no-base", "--api-key", "k", "--max-new-tokens", "64"]
    args += ["--max-prompt-tokens", "100", "--max-body-kb", "2", "--timeout", "5"]
    args += ["--no-disclaimer", "--no-emergency-notice", "--engine", "transformers"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (options,) = seen
    assert (options.spec, options.adapter, options.with_base, options.engine) == (
        "base-model",
        None,
        False,
        "transformers",
    )
    assert options.n_ctx == 164
    served = Served(None, None, "base-model", None, GenerationConfig(max_new_tokens=300))  # type: ignore[arg-type]
    limits = options.limits(served)
    assert (limits.api_key, limits.max_new_tokens, limits.default_max_tokens) == ("k", 64, 64)
    assert (limits.max_body_bytes, limits.request_timeout_s) == (2048, 5.0)
    assert limits.safety.disclaimer is None and not limits.safety.emergency_notices
    default = server.ServeOptions("base-model").safety()
    assert default.disclaimer and default.emergency_notices
