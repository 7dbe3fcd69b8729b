"""`medlora serve --engine vllm` for real, with two adapters, through the OpenAI client.

Opt-in (`make vllm`): vLLM lives in an environment of its own (it pins its own torch and
transformers), named by MEDLORA_VLLM_PYTHON. Skipped when that is not set.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from helpers import tiny_records, write_prepared

from medlora.config import recipe_from_dict

VLLM_PYTHON = os.environ.get("MEDLORA_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON, reason="opt-in: `make vllm` sets MEDLORA_VLLM_PYTHON"
)
SMOLLM2 = "smollm2-135m-instruct"
KEY = "vllm-test-key-4821"
STARTUP_S = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, smollm2_cache: Path) -> dict[str, Path]:
    """Two short real SmolLM2 runs whose adapters differ (different learning rates)."""
    from medlora.train import train

    mp = pytest.MonkeyPatch()
    mp.setenv("MEDLORA_CACHE", str(smollm2_cache))
    root = tmp_path_factory.mktemp("vllm")
    records = tiny_records()
    prepared = write_prepared(root / "prepared", records[:12], records[12:14], records[14:16])
    out = {}
    for name, lr in (("cardio", "0.002"), ("derm", "0.004")):
        recipe = recipe_from_dict(
            {"model": {"name": SMOLLM2}},
            ["train.max_steps=4", "train.batch_size=4", "train.grad_accum=1", f"train.lr={lr}",
             "lora.target_modules=all-linear", "train.eval_steps=0"],
        )  # fmt: skip
        train(recipe, root / name, prepared_dir=prepared)
        out[name] = root / name
    yield out
    mp.undo()


@pytest.fixture(scope="module")
def server(runs: dict[str, Path], smollm2_cache: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "MEDLORA_API_KEY": KEY, "MEDLORA_CACHE": str(smollm2_cache)}
    command = [sys.executable, "-m", "medlora", "serve", SMOLLM2, "--engine", "vllm"]
    command += ["--port", str(port), "--max-prompt-tokens", "512", "--max-new-tokens", "64"]
    for name, run in runs.items():
        command += ["--adapter", f"{name}={run}"]
    process = subprocess.Popen(command, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            assert process.poll() is None, "medlora serve --engine vllm exited"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            pytest.fail(f"vLLM did not answer /health within {STARTUP_S} s")
        yield url
        # A SIGTERM to `medlora serve` alone (as systemd or `kill` sends it) stops vLLM too.
        process.terminate()
        process.wait(timeout=60)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)


def test_vllm_lists_both_adapters_on_the_base(server: str) -> None:
    models: dict[str, Any] = {m.id: m for m in client(server).models.list().data}
    assert set(models) == {SMOLLM2, "cardio", "derm"}
    assert models["cardio"].model_extra["parent"] == SMOLLM2
    assert models["derm"].model_extra["parent"] == SMOLLM2


def test_vllm_answers_per_adapter_and_needs_the_key(server: str) -> None:
    question = [{"role": "user", "content": "What is hypertension?"}]
    answers = {}
    for name in ("cardio", "derm", SMOLLM2):
        reply = client(server).chat.completions.create(
            model=name, messages=question, max_tokens=16, temperature=0
        )  # type: ignore[arg-type]
        answers[name] = reply.choices[0].message.content
        assert answers[name]
    assert len(set(answers.values())) >= 2  # the adapters change the answer
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()


def test_the_api_key_is_not_on_any_command_line(server: str) -> None:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        assert KEY not in text, f"the key is visible in `ps`: {text[:200]}"
