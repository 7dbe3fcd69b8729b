"""`medlora serve` as a user starts it: a real process on 127.0.0.1, then the OpenAI client."""

from __future__ import annotations

import dataclasses
import itertools
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
from medlora.errors import ConfigError


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


def test_vllm_command_serves_every_adapter_and_keeps_the_key_off_the_command_line(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    import sys

    from medlora.serve.server import ServeOptions, vllm_command, vllm_environment

    run = train_tiny_run(tmp_path, tiny_model_dir)
    options = ServeOptions(
        str(tiny_model_dir),
        (f"cardio={run}", str(run)),
        max_new_tokens=256,
        max_prompt_tokens=1024,
        api_key="s3cret-key",
        vllm_python=sys.executable,
    )
    command = vllm_command(options)

    def values(flag: str) -> list[str]:
        start = command.index(flag) + 1
        return list(itertools.takewhile(lambda c: not c.startswith("--"), command[start:]))

    assert command[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert values("--model") == [str(tiny_model_dir)]
    assert values("--lora-modules") == [f"cardio={run.resolve()}", f"run={run.resolve()}"]
    assert values("--max-lora-rank") == ["8"]  # the runs' r, rounded up to a rank vLLM accepts
    assert values("--chat-template") == [str(run.resolve() / "chat_template.jinja")]
    assert values("--max-model-len") == ["1280"]
    assert "s3cret-key" not in " ".join(command)  # `ps` shows command lines to every user
    assert vllm_environment(options)["VLLM_API_KEY"] == "s3cret-key"
    hot = ServeOptions(str(tiny_model_dir), (str(run),), vllm_python=sys.executable)
    with pytest.raises(ConfigError, match="adapter-root"):
        vllm_command(dataclasses.replace(hot, allow_adapter_updates=True))


def test_threads_default_to_physical_cores_capped_by_omp(monkeypatch: pytest.MonkeyPatch) -> None:
    from medlora.machine import default_threads, physical_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert 1 <= default_threads() == physical_cores() <= (os.cpu_count() or 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a shared machine's cap wins
    assert default_threads() == 1


def test_serve_command_hands_one_options_object(monkeypatch: pytest.MonkeyPatch) -> None:
    """`medlora serve` flags → one `ServeOptions`; its limits and safety are what the app enforces."""
    from medlora.config import GenerationConfig
    from medlora.serve import completions, server
    from medlora.serve.adapters import ServedModel
    from medlora.serve.schemas import GenerationRequest

    seen: list[server.ServeOptions] = []
    monkeypatch.setattr(server, "serve", lambda options, console=None: seen.append(options) or 0)
    args = ["serve", "base-model", "--no-base", "--api-key", "k", "--max-new-tokens", "64"]
    args += ["--max-prompt-tokens", "100", "--max-body-kb", "2", "--timeout", "5"]
    args += ["--no-disclaimer", "--no-emergency-notice", "--engine", "transformers"]
    args += ["--adapter", "cardio=runs/a", "--adapter", "runs/b", "--batching", "static"]
    args += ["--llama-cpp-adapters", "merged"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (options,) = seen
    assert (options.spec, options.adapters, options.with_base, options.engine) == (
        "base-model",
        ("cardio=runs/a", "runs/b"),
        False,
        "transformers",
    )
    assert options.batching == "static" and not options.allow_adapter_updates
    assert options.llama_cpp_adapters == "merged"
    assert options.n_ctx == 164
    # The options are the app's limits; a request that names no length gets its run's, capped.
    base = ServedModel("base-model", None, None, GenerationConfig(max_new_tokens=300))
    assert completions.max_tokens(options, base, GenerationRequest(), None) == 64
    assert (options.api_key, options.max_body_kb, options.timeout_s) == ("k", 2, 5.0)
    assert options.safety.disclaimer is None and not options.safety.emergency_notices
    default = server.ServeOptions("base-model").safety
    assert default.disclaimer and default.emergency_notices
    seen.clear()
    monkeypatch.delenv("MEDLORA_API_KEY", raising=False)
    monkeypatch.delenv("MEDLORA_VLLM_PYTHON", raising=False)
    assert CliRunner().invoke(app, ["serve", "base-model"]).exit_code == 0
    assert seen == [server.ServeOptions("base-model")]  # the command's defaults are the options'


def test_an_unknown_llama_cpp_adapters_mode_is_one_line_before_loading() -> None:
    from medlora.errors import ConfigError
    from medlora.serve.loader import build_engine

    with pytest.raises(ConfigError, match="--llama-cpp-adapters both: use lora or merged"):
        build_engine("no-such-model", llama_cpp_adapters="both")
