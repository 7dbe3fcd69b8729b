"""Multiple-choice benchmarks: hand-checked scoring, file shapes with bad rows, `medlora bench`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_records, write_prepared
from typer.testing import CliRunner

from medlora.cli import app
from medlora.errors import DataError
from medlora.evaluate.harness import harness_task, score_items
from medlora.evaluate.multiple_choice_sets import (
    MCItem,
    load_benchmark,
    load_medmcqa,
    load_medqa,
    load_mmlu,
    load_pubmedqa,
)
from medlora.models import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_model(str(tiny_model_dir))


def _loglikelihood(model: Any, tokenizer: Any, context: str, continuation: str) -> float:
    """log P(continuation | context), summed over its tokens, computed directly."""
    whole = tokenizer(context + continuation)["input_ids"]
    n_context = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
    return sum(float(logits[i - 1, whole[i]]) for i in range(n_context, len(whole)))


ITEMS = [
    MCItem(
        "a",
        "Is asthma a disease of the airways?",
        ["yes", "no", "maybe"],
        0,
        "pubmedqa",
        "Asthma narrows the airways.",
    ),
    MCItem(
        "b",
        "Is anemia caused by low iron?",
        ["yes", "no", "maybe"],
        2,
        "pubmedqa",
        "Low iron, B12 deficiency or blood loss.",
    ),
]


def test_scores_equal_a_hand_computed_log_likelihood(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    task = harness_task("pq", "pubmedqa", ITEMS, [], 0)
    rows = score_items(model, tokenizer, {"pq": task}, batch_size=2, keep_prompts=True)
    assert [r["id"] for r in rows] == ["a", "b"]
    for row, item in zip(rows, ITEMS, strict=True):
        assert row["prompt"] == f"Abstract: {item.context}\nQuestion: {item.question}\nAnswer:"
        expected = [_loglikelihood(model, tokenizer, row["prompt"], " " + o) for o in item.options]
        assert row["loglikelihoods"] == pytest.approx(expected, abs=1e-4)
        best = max(range(3), key=lambda i: expected[i])
        best_norm = max(range(3), key=lambda i: expected[i] / len(item.options[i]))
        assert row["acc"] == float(best == item.answer_index)
        assert row["acc_norm"] == float(best_norm == item.answer_index)


def test_identical_option_lengths_make_acc_norm_equal_acc(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    items = [
        MCItem(str(i), f"Question {i}?", ["w", "x", "y", "z"], i % 4, "letters") for i in range(8)
    ]
    rows = score_items(model, tokenizer, {"t": harness_task("t", "mmlu", items, [], 0)})
    assert len(rows) == 8
    assert all(r["acc"] == r["acc_norm"] for r in rows)  # choices are A-D: same length


def test_mmlu_csv_bad_rows_are_counted_or_refused(tmp_path: Path) -> None:
    (tmp_path / "val").mkdir()
    (tmp_path / "dev").mkdir()
    (tmp_path / "val" / "anatomy_val.csv").write_text(
        "What is the femur?,A bone,A muscle,A nerve,A vessel,A\n"
        "Only three columns,x,y\n"
        "Bad answer letter?,a,b,c,d,E\n"
        '"Quoted, with comma?",one,two,three,four,d\n'
    )
    (tmp_path / "dev" / "anatomy_dev.csv").write_text("Shot?,a,b,c,d,B\n")
    items, shots, report = load_mmlu(tmp_path)
    assert [i.question for i in items] == ["What is the femur?", "Quoted, with comma?"]
    assert items[1].answer_index == 3 and len(shots) == 1
    assert sum(report.skipped.values()) == 2
    assert any("anatomy_val.csv: row 2" in w for w in report.warnings)
    with pytest.raises(DataError, match=r"anatomy_val.csv: row 2: has 3 columns"):
        load_mmlu(tmp_path, strict=True)


def test_pubmedqa_json_bad_items_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "pq.json"
    path.write_text(
        json.dumps(
            {
                "1": {"QUESTION": "Q1?", "CONTEXTS": ["c1", "c2"], "final_decision": "yes"},
                "2": {"QUESTION": "Q2?", "CONTEXTS": ["c"], "final_decision": "perhaps"},
                "3": {"CONTEXTS": ["c"], "final_decision": "no"},
                "4": "not an object",
            }
        )
    )
    items, report = load_pubmedqa(path)
    assert len(items) == 1 and items[0].context == "c1\nc2" and items[0].answer_index == 0
    assert sum(report.skipped.values()) == 3
    with pytest.raises(DataError, match=r"pq.json: item 2: final_decision is not yes/no/maybe"):
        load_pubmedqa(path, strict=True)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="broken.json: line 1 is not valid JSON"):
        load_pubmedqa(tmp_path / "broken.json")


def test_medmcqa_and_medqa_shapes(tmp_path: Path) -> None:
    medmcqa = tmp_path / "medmcqa.jsonl"
    medmcqa.write_text(
        "\n".join(
            [
                json.dumps(
                    {"question": "Q1", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 4}
                ),
                json.dumps(
                    {"question": "Q2", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1}
                ),
                "{broken",
                json.dumps({"question": "Q3", "opa": "a", "cop": 2}),
            ]
        )
    )
    items, report = load_medmcqa(medmcqa)
    assert [i.answer_index for i in items] == [3, 0]  # authors' 1-4 numbering
    assert sum(report.skipped.values()) == 2
    medqa = tmp_path / "medqa.jsonl"
    medqa.write_text(
        "\n".join(
            [
                json.dumps(
                    {
                        "question": "Q",
                        "options": {"A": "x", "B": "y", "C": "z", "D": "w", "E": "v"},
                        "answer_idx": "E",
                    }
                ),
                json.dumps(
                    {
                        "sent1": "Q",
                        "ending0": "x",
                        "ending1": "y",
                        "ending2": "z",
                        "ending3": "w",
                        "label": 1,
                    }
                ),
                json.dumps({"question": "Q", "options": {"A": "x"}, "answer_idx": "C"}),
            ]
        )
    )
    items, report = load_medqa(medqa)
    assert [(len(i.options), i.answer_index) for i in items] == [(5, 4), (4, 1)]
    assert report.skipped == {"answer_idx 'C' is not one of A": 1}


def test_wrong_data_kind_and_missing_file_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not fit task pubmedqa: write pubmedqa:PATH"):
        load_benchmark("pubmedqa", f"mmlu:{tmp_path}")
    with pytest.raises(DataError, match="nope.json: file not found"):
        load_benchmark("pubmedqa", f"pubmedqa:{tmp_path / 'nope.json'}")


def test_k_shot_prompts_hold_dev_exemplars_with_answers(
    tiny: tuple[Any, Any], data_dir: Path
) -> None:
    from medlora.evaluate.harness import task_units

    model, tokenizer = tiny
    bench = load_benchmark("mmlu_medical", f"mmlu:{data_dir / 'mmlu_medical'}")
    items = [i for i in bench.items if i.subject == "anatomy"][:2]
    rows = score_items(model, tokenizer, task_units(bench, items, 2), keep_prompts=True)
    prompt = rows[0]["prompt"]
    dev = [i for i in bench.shots_pool if i.subject == "anatomy"][:2]
    assert prompt.startswith(
        "The following are multiple choice questions (with answers) about "
        "anatomy.\n\n" + dev[0].question.strip()
    )
    assert f"Answer: {'ABCD'[dev[0].answer_index]}\n\n{dev[1].question.strip()}" in prompt
    assert prompt.endswith(
        f"{items[0].question.strip()}\nA. {items[0].options[0]}\n"
        f"B. {items[0].options[1]}\nC. {items[0].options[2]}\n"
        f"D. {items[0].options[3]}\nAnswer:"
    )

    pq = load_benchmark("pubmedqa", f"pubmedqa:{data_dir / 'pubmedqa' / 'pqal_dev.json'}")
    units = task_units(pq, pq.items[:4], 1)
    rows = score_items(model, tokenizer, units, keep_prompts=True)
    assert [r["id"] for r in rows] == [i.id for i in pq.items[1:4]]  # the exemplar is not scored
    assert all(r["prompt"].count("Abstract:") == 2 for r in rows)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    from medlora.config import recipe_from_dict
    from medlora.train import train

    root = tmp_path_factory.mktemp("bench-run")
    records = tiny_records(1)
    prepared = write_prepared(root / "prepared", records, records[:2], records[:2])
    recipe = recipe_from_dict(
        {"model": {"name": str(tiny_model_dir)}},
        ["train.lr=0.01", "train.max_steps=3", "train.grad_accum=1"],
    )
    train(recipe, root / "run", prepared_dir=prepared)
    return root / "run"


def test_bench_cli_on_the_real_files_writes_the_promised_shape(
    tmp_path: Path, tiny_model_dir: Path, tiny_run: Path, data_dir: Path
) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--model",
            str(tiny_model_dir),
            "--adapter",
            str(tiny_run),
            "--tasks",
            "pubmedqa,mmlu_medical",
            "--data",
            f"pubmedqa:{data_dir / 'pubmedqa' / 'pqal_dev.json'}",
            "--data",
            f"mmlu:{data_dir / 'mmlu_medical'}",
            "--limit",
            "6",
            "--compare-base",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    tasks = json.loads(out.read_text())["tasks"]
    assert tasks["pubmedqa"]["chance"] == pytest.approx(1 / 3)
    assert tasks["mmlu_medical"]["chance"] == pytest.approx(0.25)
    for task in tasks.values():
        assert task["n"] == 6
        for key in ("acc", "acc_norm", "base_acc", "base_acc_norm"):
            assert 0.0 <= task[key] <= 1.0
        assert task["diff_acc"]["mean"] == pytest.approx(task["acc"] - task["base_acc"])
    subjects = tasks["mmlu_medical"]["subjects"]
    assert sum(s["n"] for s in subjects.values()) == 6 and len(subjects) > 1
    assert tasks["mmlu_medical"]["acc"] == tasks["mmlu_medical"]["acc_norm"]
    assert "chance 0.333" in result.output and "macro average" in result.output


def test_bench_unknown_task_is_one_line(tiny_model_dir: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "--model", str(tiny_model_dir), "--tasks", "usmle"])
    assert result.exit_code == 2
    assert "unknown task 'usmle': choose from pubmedqa, mmlu_medical" in result.output


def test_chat_option_wraps_prompts_in_the_chat_template(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    task = harness_task("pq", "pubmedqa", ITEMS[:1], [], 0)
    rows = score_items(
        model, tokenizer, {"pq": task}, chat=True, system_prompt="Be careful.", keep_prompts=True
    )
    prompt = rows[0]["prompt"]
    assert prompt.startswith("<|im_start|>system\nBe careful.<|im_end|>")
    assert "Question: Is asthma a disease of the airways?" in prompt
    assert prompt.rstrip().endswith("<|im_start|>assistant")


def test_data_for_no_selected_task_is_refused_before_loading_a_model(tmp_path: Path) -> None:
    from medlora.evaluate.multiple_choice import BenchOptions, run_bench

    options = BenchOptions(model="no-such-model", tasks=["pubmedqa"], data=[f"mmlu:{tmp_path}"])
    with pytest.raises(DataError, match="is for no task in --tasks pubmedqa"):
        run_bench(options)


@pytest.mark.slow
def test_smollm2_pubmedqa_scores_equal_hand_computed_ones(
    monkeypatch: pytest.MonkeyPatch, smollm2_cache: Path, data_dir: Path
) -> None:
    """The same check as above with a real tokenizer (BPE merges across the prompt/answer seam)."""
    from medlora.evaluate.harness import task_units

    monkeypatch.setenv("MEDLORA_CACHE", str(smollm2_cache))
    model, tokenizer = load_model("smollm2-135m-instruct")
    bench = load_benchmark("pubmedqa", f"pubmedqa:{data_dir / 'pubmedqa' / 'pqal_dev.json'}")
    rows = score_items(model, tokenizer, task_units(bench, bench.items[:1], 0), keep_prompts=True)
    for row, item in zip(rows, bench.items[:1], strict=True):
        expected = [_loglikelihood(model, tokenizer, row["prompt"], " " + o) for o in item.options]
        assert row["loglikelihoods"] == pytest.approx(expected, abs=1e-3)
        assert row["acc"] == float(max(range(3), key=lambda i: expected[i]) == item.answer_index)


def test_mmlu_continuation_scores_the_option_text(tiny: tuple[Any, Any], data_dir: Path) -> None:
    from medlora.evaluate.harness import task_units

    model, tokenizer = tiny
    bench = load_benchmark("mmlu_medical_continuation", f"mmlu:{data_dir / 'mmlu_medical'}")
    item = next(i for i in bench.items if i.subject == "anatomy")
    rows = score_items(model, tokenizer, task_units(bench, [item], 0), keep_prompts=True)
    prompt = rows[0]["prompt"]
    assert prompt == (
        "The following are questions (with answers) about anatomy.\n\n"
        f"Question: {item.question.strip()}\nAnswer:"
    )
    expected = [_loglikelihood(model, tokenizer, prompt, " " + o) for o in item.options]
    assert rows[0]["loglikelihoods"] == pytest.approx(expected, abs=1e-4)
    best_norm = max(range(4), key=lambda i: expected[i] / len(item.options[i]))
    assert rows[0]["acc_norm"] == float(best_norm == item.answer_index)
