"""Answer quality: hand-checked scores, bootstrap intervals, empty answers, `medlora eval --metrics`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import tiny_records, write_prepared
from typer.testing import CliRunner

from medlora.cli import app
from medlora.errors import ConfigError
from medlora.evaluate.quality import (
    bootstrap_ci,
    evaluate_answers,
    paired_bootstrap_ci,
    parse_metrics,
    rouge_l,
    score_answers,
    token_f1,
)


def test_token_f1_matches_a_hand_computed_case() -> None:
    # After SQuAD normalisation: pred = [iron, deficiency, causes, anemia],
    # ref = [low, iron, causes, anemia, often]; overlap 3 → P 3/4, R 3/5, F1 = 2PR/(P+R) = 2/3.
    assert token_f1("Iron deficiency causes the anemia.", "Low iron causes anemia, often") == (
        pytest.approx(2 / 3)
    )
    assert token_f1("", "anything") == 0.0
    assert token_f1("The", "a") == 1.0  # both empty after normalisation (SQuAD convention)


def test_rouge_l_matches_a_hand_computed_case() -> None:
    # LCS of "the cat sat on the mat" / "the cat lay on the mat" is 5 tokens of 6 → F = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    assert rouge_l("", "the cat") == 0.0


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_data() -> None:
    values = [0.0, 1.0] * 10
    small = bootstrap_ci(values, seed=1)
    large = bootstrap_ci(values * 20, seed=1)
    assert small["mean"] == pytest.approx(0.5)
    assert small["low"] < 0.5 < small["high"]
    assert large["high"] - large["low"] < small["high"] - small["low"]
    constant = bootstrap_ci([0.3] * 5)
    assert constant["low"] == pytest.approx(0.3) and constant["high"] == pytest.approx(0.3)


def test_paired_interval_sees_a_consistent_small_gain() -> None:
    # Every example gains 0.05 while examples differ a lot: only a paired interval excludes zero.
    base = [i / 20 for i in range(20)]
    tuned = [b + 0.05 for b in base]
    diff = paired_bootstrap_ci(tuned, base)
    assert diff["low"] == pytest.approx(0.05) and diff["high"] == pytest.approx(0.05)
    unpaired_low = bootstrap_ci(tuned)["low"] - bootstrap_ci(base)["high"]
    assert unpaired_low < 0


def test_empty_predictions_score_zero_everywhere() -> None:
    scores = score_answers(["", "  "], ["Wheezing and cough.", "Insulin."])
    assert scores == {
        "rougeL": [0.0, 0.0],
        "f1": [0.0, 0.0],
        "similarity": [0.0, 0.0],
        "repetition": [0.0, 0.0],  # no 4-gram at all; `echo` needs the questions
        "length": [0.0, 0.0],
    }


def test_similarity_ranks_a_paraphrase_above_an_unrelated_answer() -> None:
    scores = score_answers(
        ["Anemia is often caused by low iron.", "The stock market closed higher today."],
        ["Low iron levels commonly cause anemia."] * 2,
        ["similarity"],
    )["similarity"]
    assert scores[0] > 0.6 > scores[1]


def test_unknown_metric_is_one_clear_error() -> None:
    assert parse_metrics("loss, rouge,F1") == ["loss", "rouge", "f1"]
    with pytest.raises(ConfigError, match="unknown bleu; choose from loss, rouge, f1, similarity"):
        parse_metrics("rouge,bleu")


def test_evaluate_answers_writes_predictions_and_counts_empty(tmp_path: Path) -> None:
    records = tiny_records(1)

    def fake_generate(model, tokenizer, questions, *args):  # type: ignore[no-untyped-def]
        # The "model" repeats the reference for the first two questions and says nothing after.
        answers = {r.question: r.answer for r in records}
        return [answers[q] if i < 2 else "" for i, q in enumerate(questions)]

    out = tmp_path / "predictions.jsonl"
    result = evaluate_answers(
        None, None, records, None, ["rouge", "f1"], predictions_path=out, generate=fake_generate
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["f1"] for r in rows] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert rows[0]["prediction"] == records[0].answer and rows[0]["reference"] == records[0].answer
    assert result.empty_predictions == 3
    assert result.metrics["f1"].model.mean == pytest.approx(0.4)
    # the same rows come back in memory, typed (the file is for later readers)
    assert [a.model_dump(exclude_unset=True) for a in result.answers] == rows


def test_eval_cli_scores_base_and_tuned_with_intervals(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from medlora.config import recipe_from_dict
    from medlora.train import train

    records = tiny_records(2)
    prepared = write_prepared(tmp_path / "prepared", records[:5], records[5:7], records[5:10])
    # A source the run never trains on: the second panel, scored beside the split.
    unseen = tmp_path / "unseen.jsonl"
    unseen.write_text(
        "".join(
            json.dumps({"question": f"{r.question} (elsewhere)", "answer": r.answer}) + "\n"
            for r in records[:5]  # five different questions (hygiene drops repeats)
        )
    )
    recipe = recipe_from_dict(
        {"model": {"name": str(tiny_model_dir)}},
        [
            "train.lr=0.02",
            "train.epochs=10",
            "train.grad_accum=1",
            "train.batch_size=5",
            "lora.dropout=0",
            "lora.target_modules=all-linear",
            "data.system_prompt=null",
            f"eval.unseen_sources=[jsonl:{unseen}]",
        ],
    )
    train(recipe, tmp_path / "run", prepared_dir=prepared)
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--adapter",
            str(tmp_path / "run"),
            "--data",
            str(prepared),
            "--metrics",
            "loss,rouge,f1,length",
            "--compare-base",
            "--max-new-tokens",
            "16",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["loss"] < saved["base_loss"]  # the loss part is unchanged
    quality = saved["quality"]
    assert quality["examples"] == 5 and quality["max_new_tokens"] == 16
    for name in ("rougeL", "f1"):
        entry = quality["metrics"][name]
        assert set(entry) == {"model", "base", "diff"}
        assert entry["model"]["low"] <= entry["model"]["mean"] <= entry["model"]["high"]
        assert entry["diff"]["mean"] == pytest.approx(
            entry["model"]["mean"] - entry["base"]["mean"]
        )
    # The test questions repeat the training ones, so the tuned answers must be closer to them.
    assert quality["metrics"]["f1"]["diff"]["mean"] > 0
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and {"prediction", "base_prediction", "f1", "base_f1"} <= set(rows[0])
    assert "rougeL" in result.output and "base" in result.output
    # Length in words, beside the references' mean length.
    assert quality["metrics"]["length"]["model"]["mean"] == pytest.approx(
        sum(len(r["prediction"].split()) for r in rows) / len(rows)
    )
    assert quality["reference_words"] == pytest.approx(
        sum(len(r["reference"].split()) for r in rows) / len(rows)
    )
    # The second panel: the run's eval.unseen_sources, same metrics, its own answers file.
    panel = saved["unseen"]
    assert panel["panel"] == "unseen" and panel["examples"] == 5
    assert panel["base_loss"] is not None and set(panel["quality"]["metrics"]) == {
        "rougeL",
        "f1",
        "length",
    }
    assert panel["quality"]["max_new_tokens"] == 16
    unseen_rows = (tmp_path / "predictions_unseen.jsonl").read_text().splitlines()
    assert len(unseen_rows) == 5 and "(elsewhere)" in json.loads(unseen_rows[0])["question"]
    assert "Both panels" in result.output and "Sources never trained on" in result.output


def test_quality_is_logged_during_training_and_picks_the_best_adapter(
    tmp_path: Path, tiny_model_dir: Path, data_dir: Path
) -> None:
    from safetensors.torch import load_file

    from medlora.config import recipe_from_dict
    from medlora.train import train

    records = tiny_records(2)
    prepared = write_prepared(tmp_path / "prepared", records[:5], records[:5], records[5:7])
    recipe = recipe_from_dict(
        {"model": {"name": str(tiny_model_dir)}},
        [
            "train.lr=0.02",
            "train.max_steps=4",
            "train.grad_accum=1",
            "train.batch_size=5",
            "train.eval_steps=2",
            "lora.dropout=0",
            "lora.target_modules=all-linear",
            "eval.during_training_every=2",
            "eval.during_training_examples=3",
            "eval.during_training_max_new_tokens=8",
            "eval.during_training_metrics=[f1]",
            "eval.during_training_benchmark=mmlu_medical",
            f"eval.during_training_benchmark_data=mmlu:{data_dir / 'mmlu_medical'}",
            "eval.during_training_benchmark_limit=2",
            "eval.best_metric=eval_loss",
            # "max" picks the worst checkpoint: an early one, so restoring it is really tested.
            "eval.best_metric_mode=max",
        ],
    )
    train(recipe, tmp_path / "run", prepared_dir=prepared)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    quality = [r for r in rows if "quality_f1" in r]
    assert [r["step"] for r in quality] == [2, 4]
    assert not any("quality_rougeL" in r for r in rows)  # only the answer scores asked for
    assert all({"bench_mmlu_medical_acc", "bench_mmlu_medical_acc_norm"} <= set(r) for r in quality)
    assert all(0.0 <= r["bench_mmlu_medical_acc"] <= 1.0 for r in quality)
    # eval_loss is logged at steps 2, 4 and once more after training; the chosen one of those
    # logged during training is recorded, and its adapter is the one left in the run directory.
    evals = [r for r in rows if "eval_loss" in r][:2]
    best = json.loads((run / "best.json").read_text())
    expected = max(evals, key=lambda r: r["eval_loss"])
    assert best["metric"] == "eval_loss" and best["mode"] == "max"
    assert best["step"] == expected["step"] < 4
    assert best["value"] == pytest.approx(expected["eval_loss"])
    saved, chosen = (
        load_file(run / "adapter_model.safetensors"),
        load_file(run / "best" / "adapter_model.safetensors"),
    )
    assert saved.keys() == chosen.keys()
    assert all((saved[k] == chosen[k]).all() for k in saved)
    assert (run / "best" / "recipe.yaml").is_file()
    # The report charts what was logged during training and names the chosen step.
    from medlora.report.card import write_report

    card = write_report(run)["card"].read_text()
    assert (run / "charts" / "quality.png").read_bytes()[:4] == b"\x89PNG"
    assert "![quality](charts/quality.png)" in card
    assert f"eval_loss = {best['value']:.4f} at step {best['step']}" in card


def test_best_metric_mode_follows_the_metric_name() -> None:
    from medlora.train.quality_callback import metric_mode

    assert metric_mode("eval_loss") == "min" and metric_mode("quality_rougeL") == "max"
    assert metric_mode("bench_pubmedqa_acc") == "max" and metric_mode("loss", "max") == "max"


def test_repetition_is_the_share_of_repeated_word_4grams() -> None:
    from medlora.evaluate.quality import repeated_ngram_share

    assert repeated_ngram_share("Asthma makes the airways narrow and swollen.") == 0.0
    looped = "The symptoms of X can include: The symptoms of X can include: fever."
    # 13 words → 10 four-grams, of which 3 repeat an earlier one ("the symptoms of x" …).
    assert repeated_ngram_share(looped) == pytest.approx(3 / 10)
    assert repeated_ngram_share("too short") == 0.0


def test_echo_counts_answers_that_restate_the_question() -> None:
    questions = ["What are the symptoms of kidney stones ?"] * 3
    answers = [
        "What are the symptoms of kidney stones? The symptoms include pain.",
        "Kidney stones cause sharp pain in the back, side and groin.",
        "",
    ]
    scores = score_answers(answers, ["ref"] * 3, ["echo", "repetition"], questions)
    assert scores["echo"] == [1.0, 0.0, 0.0]
    assert parse_metrics("loss,repetition,echo") == ["loss", "repetition", "echo"]
