"""One `generation:` section reaches every command that generates: each test reads what it used."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import tiny_records, write_prepared
from serve_support import train_tiny_run
from typer.testing import CliRunner

from medlora.cli import app
from medlora.config import GenerationConfig, load_recipe

SETTINGS = {"max_new_tokens": 12, "repetition_penalty": 1.3, "no_repeat_ngram_size": 3}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A trained run whose recipe.yaml asks for repetition control and short answers."""
    folder = train_tiny_run(tmp_path_factory.mktemp("generation"), tiny_model_dir)
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    recipe["generation"] = {**recipe.get("generation", {}), **SETTINGS}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder


@pytest.fixture
def served_with(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The sampling every request on the continuous engine decoded with (its logits processors)."""
    from medlora.serve import token_rules

    calls: list[dict[str, Any]] = []
    original = token_rules.logits_processors

    def spy(sampling: Any) -> Any:
        calls.append({key: getattr(sampling, key, None) for key in SETTINGS})
        return original(sampling)

    monkeypatch.setattr(token_rules, "logits_processors", spy)
    return calls


@pytest.fixture
def used(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What every `model.generate` call was asked for (keyword arguments or a GenerationConfig)."""
    from transformers.generation.utils import GenerationMixin

    calls: list[dict[str, Any]] = []
    original = GenerationMixin.generate

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        config = kwargs.get("generation_config")
        seen = {key: kwargs.get(key, getattr(config, key, None)) for key in SETTINGS}
        calls.append(seen)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    return calls


def assert_all_used(calls: list[dict[str, Any]]) -> None:
    assert calls, "nothing was generated"
    for call in calls:
        assert call["repetition_penalty"] == SETTINGS["repetition_penalty"]
        assert call["no_repeat_ngram_size"] == SETTINGS["no_repeat_ngram_size"]


def test_old_recipes_with_eval_max_new_tokens_still_load(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("eval:\n  max_new_tokens: 40\n")
    assert load_recipe(path).generation.max_new_tokens == 40


def test_eval_uses_the_runs_settings(
    run: Path, tiny_model_dir: Path, tmp_path: Path, used: list[dict[str, Any]]
) -> None:
    records = tiny_records(1)
    prepared = write_prepared(tmp_path / "prepared", records, records, records)
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(tiny_model_dir), "--adapter", str(run)]
    args += ["--data", str(prepared), "--metrics", "f1,repetition,echo"]
    result = CliRunner().invoke(app, [*args, "--compare-base", "--out", str(out)])
    assert result.exit_code == 0, result.output
    quality = json.loads(out.read_text())["quality"]
    assert quality["generation"] == GenerationConfig(**SETTINGS).model_dump()
    assert {"repetition", "echo"} <= set(quality["metrics"])
    assert all(call["max_new_tokens"] == 12 for call in used)
    assert_all_used(used)


def test_compare_uses_the_runs_settings(
    run: Path, tiny_model_dir: Path, tmp_path: Path, used: list[dict[str, Any]]
) -> None:
    from medlora.report.compare import run_compare

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "What causes anemia?", "answer": "Low iron."}))
    result = run_compare(str(tiny_model_dir), run, questions=questions, n=2, out_dir=tmp_path)
    assert result.generation["repetition_penalty"] == 1.3
    assert_all_used(used)


def test_generate_uses_the_runs_settings(
    run: Path, tiny_model_dir: Path, tmp_path: Path, used: list[dict[str, Any]]
) -> None:
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "What causes anemia?"}) + "\n")
    args = ["generate", str(tiny_model_dir), "--adapter", str(run), "--in", str(questions)]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a.jsonl")])
    assert result.exit_code == 0, result.output
    assert_all_used(used)


def test_serve_and_chat_use_the_runs_settings(
    run: Path, tiny_model_dir: Path, served_with: list[dict[str, Any]]
) -> None:
    from fastapi.testclient import TestClient

    from medlora.chat import Chat
    from medlora.serve.app import create_app
    from medlora.serve.loader import build_engine

    served = build_engine(str(tiny_model_dir), run, engine="transformers", with_base=False)
    assert served.models[served.default_model].generation == GenerationConfig(**SETTINGS)
    assert Chat(served).max_new_tokens == 12
    with TestClient(create_app(served)) as client:
        body = {"messages": [{"role": "user", "content": "What causes anemia?"}], "max_tokens": 8}
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert_all_used(served_with)
    served_with.clear()
    Chat(served).ask("Is hypertension inherited?")
    assert_all_used(served_with)


def test_export_and_card_carry_the_runs_settings(run: Path, tmp_path: Path) -> None:
    from medlora.export.run import export_run
    from medlora.report.card import write_report

    out = export_run(run, tmp_path / "merged", merge=True).out
    config = json.loads((out / "generation_config.json").read_text())
    assert config["repetition_penalty"] == 1.3 and config["no_repeat_ngram_size"] == 3
    assert config["max_new_tokens"] == 12 and config["do_sample"] is False
    write_report(run)
    card = (run / "README.md").read_text()
    assert "repetition_penalty=1.3" in card and "no_repeat_ngram_size=3" in card
