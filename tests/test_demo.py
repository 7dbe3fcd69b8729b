"""`medlora demo` end to end on the tiny Llama: it scores the model it just trained, in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medlora.config import recipe_from_dict
from medlora.data.prepare import load_splits
from medlora.demo import DISCLAIMER, run_demo
from medlora.evaluate import panels
from medlora.models import load_with_adapter


def _source(path: Path, prefix: str, count: int) -> str:
    rows = [
        {
            "question": f"What does the {prefix} leaflet {i} advise?",
            "answer": f"Leaflet {i} advises rest, fluids and a visit to a doctor if it persists.",
            "topic": f"{prefix}-{i}",
        }
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return f"jsonl:{path}"


def test_demo_scores_the_model_it_trained_without_reloading_it(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medlora.models

    def no_reload(*args: object, **kwargs: object) -> None:
        raise AssertionError("the demo reloaded the model from disk")

    recipe = recipe_from_dict(
        {
            "model": {"name": str(tiny_model_dir)},
            "data": {"sources": [_source(tmp_path / "seen.jsonl", "seen", 40)]},
            "eval": {"unseen_sources": [_source(tmp_path / "unseen.jsonl", "unseen", 6)]},
        },
        [
            "data.system_prompt=null",
            "data.max_seq_len=96",
            "data.val_fraction=0.1",
            "data.test_fraction=0.1",
            "train.max_steps=3",
            "train.batch_size=4",
            "train.grad_accum=1",
            "train.lr=0.01",
            "train.precision=fp32",
            "eval.precision=fp32",
            "eval.max_examples=4",
            "eval.num_answers=2",
            "generation.max_new_tokens=8",
        ],
    )
    run = tmp_path / "run"
    monkeypatch.setattr(medlora.models, "load_with_adapter", no_reload)
    result = run_demo(recipe, run, log=lambda _: None)
    monkeypatch.undo()

    assert result.train.steps == 3
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 3
    assert len(result.answers) == 2
    summary = (run / "summary.md").read_text()
    assert "## Where the fine-tune helps and where it does not" in summary
    assert f"_{DISCLAIMER}_" in summary and "3 optimizer steps" in summary
    splits = {name: len(rows) for name, rows in load_splits(run / "data").items()}
    assert f"- data: {splits} records per split (before sampling)" in summary
    for name in ("demo.json", "eval.json", "README.md", "report.html", "data/data_card.json"):
        assert (run / name).is_file(), name

    # The in-memory model's figures are the saved adapter's.
    model, tokenizer = load_with_adapter(str(tiny_model_dir), run)
    records = panels.test_panel_records(load_splits(run / "data")["test"], recipe)
    reloaded = panels.loss_base_vs_tuned(model, tokenizer, records, recipe)
    assert result.test.loss == pytest.approx(reloaded["loss"], rel=1e-5)
    assert result.test.base_loss == pytest.approx(reloaded["base_loss"], rel=1e-5)
