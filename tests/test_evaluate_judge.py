"""`medlora eval --judge` against a real `medlora serve` app on 127.0.0.1: the tiny test model,
fine-tuned here (a plain PyTorch loop, a few seconds) to answer the judge's prompts with one letter,
position-biased towards "A" as weak judges are, so verdicts come back through the real chat API's
log-probabilities (the served text carries the disclaimer, so the text alone would not parse).
Rubric arithmetic, verdict reading and order bookkeeping are checked on a fake judge, no server."""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import QA, tiny_records, write_prepared
from serve_support import ServerThread
from typer.testing import CliRunner

from medlora.cli import app
from medlora.errors import DataError
from medlora.evaluate.judge import JudgeOptions, judge_predictions, judge_rows
from medlora.evaluate.judge_client import openai_ask
from medlora.evaluate.judge_prompts import (
    PROMPTS,
    SYSTEM_PROMPT,
    pair_outcome,
    read_rubric,
    read_verdict,
    reference_items,
)
from medlora.io import write_jsonl_atomic
from medlora.report.judge import judge_markdown
from medlora.results import EvalResult, JudgeResult

# Answers of two made-up models to helpers.QA's questions (never seen in the judge's training).
ANSWERS_X = ["It is a common condition.", "See a doctor soon.", "Rest and fluids help."]
ANSWERS_Y = ["Doctors treat it with medicine.", "It often runs in families.", "Iron helps."]
TRAIN_ANSWERS = ["Wheezing and coughing.", "No idea.", "Take insulin.", "Low iron levels."]


def judge_examples(n: int = 60, seed: int = 0) -> list[tuple[str, str]]:
    """(judge prompt from the module's own templates, letter): pairwise "A" most of the time (a
    position bias for the two orders to cancel), facts and rubric items at random."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        question, reference = QA[i % len(QA)]
        a, b = rng.sample(TRAIN_ANSWERS, 2)
        kind = ("pair", "fact", "rubric")[i % 3]
        template, letters = PROMPTS[kind]
        if kind == "pair":
            prompt = template.format(question=question, reference=reference, a=a, b=b)
            examples.append((prompt, rng.choice("AAAABT")))
        else:
            examples.append(
                (template.format(question=question, answer=a, item=reference), rng.choice(letters))
            )
    return examples


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model trained on the first answer token of judge prompts, saved as a model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medlora.data.format import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    examples = [
        (
            torch.tensor([prompt_ids(tokenizer, prompt, SYSTEM_PROMPT)]),
            tokenizer.convert_tokens_to_ids(letter),
        )
        for prompt, letter in judge_examples()
    ]
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(2):
        for ids, letter in examples:
            logits = model(ids).logits[0, -1]
            torch.nn.functional.cross_entropy(logits[None], torch.tensor([letter])).backward()
            optimizer.step()
            optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("judge") / "judge"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(judge_dir: Path) -> Iterator[ServerThread]:
    from medlora.serve.app import create_app
    from medlora.serve.loader import build_engine

    served = build_engine(str(judge_dir), engine="transformers", max_batch=4)  # served as "judge"
    with ServerThread(create_app(served)) as running:  # the default disclaimer wraps every text
        yield running


def options(server: ServerThread, tmp: Path, **more: object) -> JudgeOptions:
    return JudgeOptions(url=server.url, model="judge", cache=tmp / "cache.jsonl", **more)  # type: ignore[arg-type]


def predictions(path: Path, base: list[str], tuned: list[str]) -> Path:
    rows = [
        {"question": q, "reference": r, "prediction": t, "base_prediction": b}
        for (q, r), b, t in zip(QA, base, tuned, strict=False)
    ]
    write_jsonl_atomic(path, rows)
    return path


@pytest.fixture(scope="module")
def x_vs_y(server: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> JudgeResult:
    tmp = tmp_path_factory.mktemp("x-vs-y")
    file = predictions(tmp / "predictions.jsonl", ANSWERS_X, ANSWERS_Y)
    return judge_predictions(file, options(server, tmp))


def test_verdicts_parse_from_the_served_log_probabilities(x_vs_y: JudgeResult) -> None:
    pairs, facts = x_vs_y.pairwise, x_vs_y.facts
    assert pairs is not None and facts is not None
    asked = 2 * pairs.pairs + 2 * facts.statements  # both orders; both models' statements
    assert x_vs_y.requests == asked >= 10
    unparseable = 2 * pairs.unparseable + facts.unparseable  # a bad pair costs up to 2 verdicts
    assert (asked - unparseable) / asked >= 0.9
    assert x_vs_y.judge_url.endswith("/v1")
    text = "\n".join(judge_markdown(x_vs_y))
    assert f"judge: judge at {x_vs_y.judge_url}" in text and "Position consistency" in text


def test_swapping_the_answer_sets_mirrors_win_and_loss(
    server: ServerThread, x_vs_y: JudgeResult, tmp_path: Path
) -> None:
    file = predictions(tmp_path / "predictions.jsonl", ANSWERS_Y, ANSWERS_X)
    y_vs_x = judge_predictions(file, options(server, tmp_path))  # its own cache: asked again
    forward, backward = x_vs_y.pairwise, y_vs_x.pairwise
    assert forward is not None and backward is not None
    assert y_vs_x.requests > 0
    # The judge is position-biased (some pair's orders disagree), so one order alone would not
    # mirror; both orders cancel it: X's wins are exactly Y's losses.
    assert forward.position_consistency < 1
    assert forward.win.mean == backward.loss.mean and forward.loss.mean == backward.win.mean
    assert forward.tie.mean == backward.tie.mean
    pooled = forward.win.mean + backward.win.mean - forward.loss.mean - backward.loss.mean
    assert pooled == 0 and forward.win_minus_loss.mean == -backward.win_minus_loss.mean


def test_identical_answers_are_ties(server: ServerThread, tmp_path: Path) -> None:
    file = predictions(tmp_path / "predictions.jsonl", ANSWERS_X, ANSWERS_X)
    result = judge_predictions(file, options(server, tmp_path, max_statements=0))
    pairs = result.pairwise
    assert pairs is not None and result.facts is None
    assert pairs.unparseable == 0  # ties by verdict, not by exclusion
    assert (pairs.win.mean, pairs.tie.mean, pairs.loss.mean) == (0.0, 1.0, 0.0)


def test_a_rerun_reads_the_cache_and_sends_no_request(server: ServerThread, tmp_path: Path) -> None:
    file = predictions(tmp_path / "predictions.jsonl", ANSWERS_X, ANSWERS_Y)
    settings = JudgeOptions(url=server.url, model="judge")  # cache beside the predictions
    sent: list[int] = []
    real = openai_ask(settings)

    def counting(chat: list[dict[str, str]]) -> tuple[list[tuple[str, float]], str]:
        sent.append(1)
        return real(chat)

    first = judge_predictions(file, settings, counting)
    assert len(sent) == first.requests > 0
    assert (tmp_path / "judge_cache.jsonl").is_file()
    sent.clear()
    again = judge_predictions(file, settings, counting)
    assert sent == [] and again.requests == 0 and again.cached == first.requests
    assert again.pairwise == first.pairwise and again.facts == first.facts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stderr.strip().splitlines()


def test_a_dead_endpoint_is_one_line(tmp_path: Path) -> None:
    file = predictions(tmp_path / "predictions.jsonl", ANSWERS_X, ANSWERS_Y)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, stderr = run_cli(
        "eval", "--judge", url, "--judge-model", "m", "--judge-predictions", str(file)
    )
    assert code == 2
    assert len(stderr) == 1 and stderr[0].startswith("error:") and "cannot connect" in stderr[0]


def test_a_bad_rubric_file_is_one_line(tmp_path: Path) -> None:
    file = predictions(tmp_path / "predictions.jsonl", ANSWERS_X, ANSWERS_Y)
    rubric = tmp_path / "rubric.jsonl"
    good = {"question": QA[0][0], "items": [{"text": "Names wheezing", "points": 5}]}
    bad = {"question": QA[1][0], "items": [{"text": "Names insulin", "points": "many"}]}
    rubric.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    code, stderr = run_cli(
        "eval",
        "--judge",
        "http://127.0.0.1:9",
        "--judge-model",
        "m",
        "--judge-predictions",
        str(file),
        "--judge-rubric",
        str(rubric),
    )
    assert code == 2 and len(stderr) == 1
    assert stderr[0].startswith(f"error: {rubric}:2: items.0.points:")
    for line, where in [
        ({"question": "q", "items": []}, "items:"),
        ({"question": "q", "items": [{"text": "bad", "points": -2}]}, "items: need at least one"),
        (
            {"question": "q", "items": [{"text": "zero", "points": 0}]},
            "items.0.points: must not be 0",
        ),
        ({"items": [{"text": "t", "points": 1}]}, "question:"),
    ]:
        rubric.write_text(json.dumps(line) + "\n")
        with pytest.raises(DataError, match=f"{rubric.name}:1: .*{where}"):
            read_rubric(rubric)


def test_rubric_scores_the_healthbench_way_on_a_fake_judge(tmp_path: Path) -> None:
    # Tuned meets +5 and the unwanted −4: (5 − 4) / (5 + 3) = 0.125; base meets +5 and +3: 1.0.
    # Second question: tuned meets only the unwanted item: −4 / (2 + 1) → clipped to 0; base meets +2
    # and an item whose verdict is unparseable: left out (counted), never guessed.
    rows = [
        {
            "question": "Q1?",
            "reference": "R.",
            "prediction": "tuned one",
            "base_prediction": "base one",
        },
        {
            "question": "Q2?",
            "reference": "R.",
            "prediction": "tuned two",
            "base_prediction": "base two",
        },
    ]
    rubric = [
        {
            "question": "q1?",
            "items": [
                {"text": "five", "points": 5},
                {"text": "three", "points": 3},
                {"text": "unwanted", "points": -4},
            ],
        },
        {
            "question": "Q2?",
            "items": [
                {"text": "two", "points": 2},
                {"text": "unwanted", "points": -4},
                {"text": "garbled", "points": 1},
            ],
        },
        {"question": "Not asked?", "items": [{"text": "x", "points": 1}]},
    ]
    met = {
        "tuned one": {"five", "unwanted"},
        "base one": {"five", "three"},
        "tuned two": {"unwanted"},
        "base two": {"two"},
    }
    file = tmp_path / "rubric.jsonl"
    file.write_text("".join(json.dumps(entry) + "\n" for entry in rubric))

    def fake(chat: list[dict[str, str]]) -> tuple[list[tuple[str, float]], str]:
        user = chat[-1]["content"]
        if "Criterion: " not in user:  # a pairwise question
            return [("T", -0.1)], ""
        answer = user.split("Answer: ")[1].split("\n")[0]
        criterion = user.split("Criterion: ")[1].split("\n")[0]
        if criterion == "garbled" and answer == "base two":
            return [("Sure", -0.1), ("I", -2.0)], "Sure, here is"
        return [("N", -0.5), ("Y" if criterion in met[answer] else "N", -0.2)], ""

    settings = JudgeOptions(url="http://judge.test", model="fake", rubric=file, max_statements=0)
    result = judge_rows(rows, settings, fake, predictions=str(tmp_path / "p.jsonl"))
    scores = result.rubric
    assert scores is not None and result.pairwise is not None
    assert (scores.questions, scores.unmatched, scores.unparseable, scores.excluded) == (2, 1, 1, 1)
    assert scores.score.model.mean == pytest.approx((0.125 + 0.0) / 2)
    assert scores.score.base is not None and scores.score.base.mean == pytest.approx(1.0)
    assert scores.score.diff is not None and scores.score.diff.mean == pytest.approx(0.125 - 1.0)


def test_verdicts_are_read_from_log_probabilities_then_text() -> None:
    letters = ("A", "B", "T")
    assert read_verdict([("**", -0.1), (" B", -1.0), ("A", -2.0)], "**", letters) == "B"
    assert read_verdict([], " T.\n", letters) == "T"
    assert read_verdict([("Yes", -0.1)], "Answer A", letters) is None
    # (A = base, B = tuned) then (A = tuned, B = base): the same letter twice is a position bias.
    assert pair_outcome("B", "A") == "win" and pair_outcome("A", "B") == "loss"
    assert pair_outcome("A", "A") == "tie" and pair_outcome("T", "A") == "tie"
    assert pair_outcome(None, "A") is None


def test_eval_judges_the_answers_it_generates(
    server: ServerThread, judge_dir: Path, tmp_path: Path
) -> None:
    records = tiny_records(1)
    data = write_prepared(tmp_path / "data", records, records, records[:3])
    out = tmp_path / "eval.json"
    code, stderr = run_cli(
        "eval",
        "-m",
        str(judge_dir),
        "-d",
        str(data),
        "--metrics",
        "f1",
        "--max-new-tokens",
        "6",
        "--judge",
        server.url,
        "--judge-model",
        "judge",
        "--judge-facts",
        "1",
        "-o",
        str(out),
    )
    assert code == 0, stderr
    result = EvalResult.model_validate_json(out.read_text())
    assert result.quality is not None and result.judge is not None
    assert result.judge.pairwise is None  # no --compare-base: no base answers to pair with
    assert result.judge.facts is not None and result.judge.facts.questions == 3
    assert result.judge.requests > 0 and Path(result.judge.cache).parent == tmp_path
    code, stderr = run_cli(
        "eval",
        "-m",
        str(judge_dir),
        "-d",
        str(data),
        "--metrics",
        "f1",
        "--judge",
        server.url,
        "--judge-model",
        "no-such-judge",
    )
    assert code == 2 and len(stderr) == 1 and "no-such-judge" in stderr[0]


def test_references_become_short_statements_capped() -> None:
    reference = "Anemia is common. Yes. See a doctor, e.g. a GP, soon!\n- low iron in the blood\n"
    assert reference_items(reference) == [
        "Anemia is common.",
        "See a doctor, e.g. a GP, soon!",
        "low iron in the blood",
    ]
    many = " ".join(f"Statement number {i} holds." for i in range(20))
    assert reference_items(many, 8) == [f"Statement number {i} holds." for i in range(8)]
