"""`medlora compare`: base and fine-tuned answers side by side in compare.{json,md,html}."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import tiny_records, write_prepared
from typer.testing import CliRunner

from medlora.cli import app
from medlora.errors import DataError
from medlora.report.compare import read_questions


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    from medlora.config import recipe_from_dict
    from medlora.train import train

    root = tmp_path_factory.mktemp("compare-run")
    records = tiny_records(1)
    prepared = write_prepared(root / "prepared", records, records[:2], records[:2])
    recipe = recipe_from_dict(
        {"model": {"name": str(tiny_model_dir)}},
        [
            "train.lr=0.02",
            "train.max_steps=4",
            "train.grad_accum=1",
            "lora.target_modules=all-linear",
        ],
    )
    train(recipe, root / "run", prepared_dir=prepared)
    return root / "run"


def test_compare_with_reference_answers_scores_both(
    tmp_path: Path, tiny_model_dir: Path, tiny_run: Path
) -> None:
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "\n".join(
            json.dumps({"question": r.question, "answer": r.answer}) for r in tiny_records(1)[:3]
        )
    )
    result = CliRunner().invoke(
        app,
        [
            "compare",
            "--model",
            str(tiny_model_dir),
            "--adapter",
            str(tiny_run),
            "--questions",
            str(questions),
            "--n",
            "2",
            "--max-new-tokens",
            "8",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert data["n"] == 2 and data["scored"] == 2
    row = data["rows"][0]
    assert {"question", "reference", "base", "tuned", "base_f1", "tuned_rougeL"} <= set(row)
    assert row["base"] != row["tuned"]  # the adapter changes the answer
    md = (tmp_path / "out" / "compare.md").read_text()
    assert row["question"] in md and "| reference |" in md and "| fine-tuned |" in md
    html = (tmp_path / "out" / "compare.html").read_text()
    assert html.count("<tr>") == 1 + 2 + 1 + len(data["metrics"])  # answers + scores tables
    assert "rougeL" in result.output or "ROUGE" in result.output


def test_compare_questions_without_answers_and_html_escaping(
    tmp_path: Path, tiny_model_dir: Path, tiny_run: Path
) -> None:
    questions = tmp_path / "q.txt"
    questions.write_text("Is <b>asthma</b> curable?\n\nWhat causes anemia?\n")
    result = CliRunner().invoke(
        app,
        [
            "compare",
            "--model",
            str(tiny_model_dir),
            "--adapter",
            str(tiny_run),
            "--questions",
            str(questions),
            "--max-new-tokens",
            "4",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["n"] == 2 and data["scored"] == 0 and data["metrics"] == {}
    html = (tmp_path / "compare.html").read_text()
    assert "Is &lt;b&gt;asthma&lt;/b&gt; curable?" in html and "<b>asthma" not in html


def test_compare_needs_exactly_one_question_source(tiny_model_dir: Path, tiny_run: Path) -> None:
    result = CliRunner().invoke(
        app, ["compare", "--model", str(tiny_model_dir), "--adapter", str(tiny_run)]
    )
    assert result.exit_code == 2
    assert "give either --questions FILE or --from-split" in result.output


def test_question_files_with_bad_rows_name_the_row(tmp_path: Path) -> None:
    bad = tmp_path / "q.csv"
    bad.write_text("question,answer\nWhat is gout?,Arthritis.\n,no question here\n")
    with pytest.raises(DataError, match=r"q.csv: row 2 has no 'question' text"):
        read_questions(bad)
    with pytest.raises(DataError, match="use a .txt, .jsonl, .json or .csv file"):
        (tmp_path / "q.xml").write_text("<q/>")
        read_questions(tmp_path / "q.xml")
