"""The shared CLI plumbing (medlora/cli/app.py) as a user of `medlora train` and `data prepare` sees it."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from medlora.cli.app import _quiet_libraries


def _warnings_while_wrapping(model_dir: Path, quiet: bool) -> list[str]:
    """The warnings shown while PEFT wraps a model for training, as `medlora train` does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with warnings.catch_warnings(record=True) as shown:
        warnings.resetwarnings()  # no filters: every warning is shown (and recorded here)
        if quiet:
            _quiet_libraries()
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    return [str(w.message) for w in shown]


def test_train_commands_hide_a_dependency_deprecation_the_user_cannot_act_on(
    tiny_model_dir: Path,
) -> None:
    # PEFT's wrap reads a deprecated transformers property: the FutureWarning would ask the user
    # to change code that is neither theirs nor medlora's.
    noisy = _warnings_while_wrapping(tiny_model_dir, quiet=False)
    assert any("is_gradient_checkpointing" in message for message in noisy)
    quiet = _warnings_while_wrapping(tiny_model_dir, quiet=True)
    assert not any("is_gradient_checkpointing" in message for message in quiet)


def test_train_command_prepares_the_recipe_data_it_was_not_given(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """`medlora train RECIPE` without --data splits the recipe's sources into RUN/data first; the
    run keeps one data card there, and the printed summary is its train_summary.json."""
    import json

    import yaml
    from typer.testing import CliRunner

    from medlora.cli import app

    source = tmp_path / "qa.jsonl"
    rows = [
        {"question": f"What does note {i} say?", "answer": f"Note {i} says rest.", "topic": f"t{i}"}
        for i in range(30)
    ]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"model": {"name": str(tiny_model_dir)}, "data": {"sources": [f"jsonl:{source}"]}}
        )
    )
    run = tmp_path / "run"
    overrides = ["train.max_steps=2", "train.batch_size=4", "train.eval_steps=0"]
    args = ["train", str(recipe), "--out", str(run)]
    result = CliRunner().invoke(app, [*args, *(f"--set={item}" for item in overrides)])
    assert result.exit_code == 0, result.output
    for split in ("train", "validation", "test"):
        assert (run / "data" / f"{split}.jsonl").is_file()
    card = json.loads((run / "data" / "data_card.json").read_text())
    assert sum(card["splits"].values()) == 30 and card["used"]["train"] == card["splits"]["train"]
    assert not (run / "data_card.json").exists()
    summary = json.loads((run / "train_summary.json").read_text())
    assert (
        summary["steps"] == 2 and f'"trained_tokens": {summary["trained_tokens"]}' in result.output
    )


def test_data_prepare_prints_a_summary_table_and_keeps_the_card_in_its_file(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    # The command turns the tokenizer's threads on; put the setting back for the other tests.
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")

    import yaml
    from typer.testing import CliRunner

    from medlora.cli import app

    source = tmp_path / "qa.jsonl"
    rows = [{"question": f"What is note {i}?", "answer": f"Note {i} says rest."} for i in range(30)]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": str(tiny_model_dir)}, "data": {}}))
    out = tmp_path / "prepared"
    args = ["data", "prepare", str(recipe), "--source", f"jsonl:{source}", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    card = json.loads((out / "data_card.json").read_text())
    assert "counting tokens: 30/30" in result.output  # every stage shows its progress
    assert "data prepared" in result.output and "tokens p50" in result.output
    train_row = next(line for line in result.output.splitlines() if " train " in line)
    assert f"{card['splits']['train']:,}" in train_row
    assert str(card["token_lengths"]["train"]["p50"]) in train_row
    assert '"per_source"' not in result.output  # the card stays in its file
