"""`medlora chat` (streaming, multi-turn, /reset) and `medlora generate` (batched JSONL) on a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from serve_support import train_tiny_run
from typer.testing import CliRunner

from medlora.chat import Chat, generate_file
from medlora.cli import app
from medlora.errors import DataError
from medlora.evaluate.generate import generate_answers
from medlora.serve.loader import Served, build_engine
from medlora.serve.safety import EMERGENCY_NOTICE


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("chat"), tiny_model_dir)


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tiny_run: Path) -> Served:
    return build_engine(str(tiny_model_dir), tiny_run, engine="transformers", with_base=False)


def test_chat_streams_and_remembers_turns(served: Served) -> None:
    chat = Chat(served, max_new_tokens=10)
    pieces: list[str] = []
    first = chat.ask("What causes anemia?", pieces.append)
    assert len(pieces) >= 2 and "".join(pieces).strip() == first
    assert served.model_set is not None
    entry = served.models[chat.model]
    alone = generate_answers(
        served.model_set.model, entry.tokenizer, ["What causes anemia?"], entry.system_prompt, 10
    )
    assert first == alone[0]
    follow_up_ids = chat.prompt_ids("And how is it treated?")
    fresh_ids = Chat(served).prompt_ids("And how is it treated?")
    assert len(follow_up_ids) > len(fresh_ids)  # the first turn is in the second prompt
    decoded = served.tokenizer.decode(follow_up_ids)
    assert "What causes anemia?" in decoded and first in decoded
    chat.ask("And how is it treated?")
    assert len(chat.history) == 4
    chat.reset()
    assert chat.history == [] and chat.prompt_ids("And how is it treated?") == fresh_ids


def test_chat_command_reset_and_emergency(tiny_model_dir: Path, tiny_run: Path) -> None:
    script = (
        "What causes anemia?\n/reset\nI think I am having a stroke, my face is drooping\n/exit\n"
    )
    result = CliRunner().invoke(
        app,
        [
            "chat",
            str(tiny_model_dir),
            "--adapter",
            str(tiny_run),
            "--engine",
            "transformers",
            "--max-new-tokens",
            "6",
        ],
        input=script,
    )
    assert result.exit_code == 0, result.output
    assert "new conversation" in result.output
    assert EMERGENCY_NOTICE.split(":")[0] in result.output.replace("\n", " ")
    assert result.output.count("medlora>") == 2


def test_generate_writes_one_answer_per_question(
    tmp_path: Path, tiny_model_dir: Path, tiny_run: Path
) -> None:
    questions = tmp_path / "questions.jsonl"
    asked = ["What causes anemia?", "How is diabetes treated?", "Is hypertension inherited?"]
    questions.write_text(
        "".join(json.dumps({"id": f"q{i}", "question": q}) + "\n" for i, q in enumerate(asked))
    )
    out = tmp_path / "answers.jsonl"
    result = CliRunner().invoke(
        app,
        [
            "generate",
            str(tiny_model_dir),
            "--adapter",
            str(tiny_run),
            "--in",
            str(questions),
            "--out",
            str(out),
            "--batch-size",
            "2",
            "--max-new-tokens",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["q0", "q1", "q2"]
    assert [row["question"] for row in rows] == asked
    assert all(row["answer"] and row["model"] == tiny_run.name for row in rows)


def test_generate_names_the_bad_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "ok?"}\n{"text": "no question field"}\n')
    with pytest.raises(DataError, match=r"q\.jsonl:2 has no \"question\""):
        generate_file(str(tiny_model_dir), None, questions, tmp_path / "a.jsonl")
    assert not (tmp_path / "a.jsonl").exists()
