"""`medlora eval --judge`: base and tuned answers judged by a model behind any OpenAI-compatible chat
API (vLLM, a hosted API, or `medlora serve` itself).

The input is a predictions JSONL (`evaluate_answers` writes it: question, reference, prediction and,
with `--compare-base`, base_prediction). Three judgments:
- pairwise: each pair asked in both orders (A = base, then A = tuned); orders that disagree make a
  tie, which cancels the judge's preference for a position. Win / tie / loss of tuned vs base with
  bootstrap intervals, win − loss paired, and the share of pairs whose orders agree;
- reference facts (HealthBench / MedScore style): each reference cut into at most 8 statements
  (`judge_prompts.reference_items`), each marked covered / contradicted / absent in each answer:
  fact recall and contradiction rate per model (per-question shares), and the paired difference;
- a user rubric file, scored as HealthBench does (`judge_prompts.rubric_score`).
Every request asks for ONE letter (max_tokens=1, temperature=0, top-5 log-probabilities), read by
`judge_prompts.read_verdict`; a reply that is no allowed letter is counted and left out, never
guessed. Replies are cached in a JSONL file beside the predictions, keyed by sha256 of (API URL,
judge model, request), so a rerun sends no request.

Why the `openai` client rather than inspect-ai: inspect-ai is an evaluation framework with its own
task / solver / scorer / log model and a large dependency tree (checked: it is not in this
environment, and its docs reach OpenAI-compatible servers through its own provider layer and log
files). This needs a few hundred single-token chat requests with log-probabilities, a cache and our
own result types; `openai` is already a dependency and brings the timeout and retries.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medlora.errors import ConfigError, DataError
from medlora.evaluate.judge_client import (
    CACHE_NAME,
    Ask,
    JudgeOptions,
    Reply,
    api_base,
    ask_all,
    check_judge,
    openai_ask,
)
from medlora.evaluate.judge_prompts import (
    FACT_LETTERS,
    PAIR_LETTERS,
    RUBRIC_LETTERS,
    RubricEntry,
    messages,
    pair_outcome,
    preference,
    read_rubric,
    read_verdict,
    reference_items,
    rubric_score,
)
from medlora.evaluate.quality import bootstrap_ci, paired_bootstrap_ci
from medlora.results import (
    CI,
    EvalResult,
    FactCheck,
    JudgeResult,
    MetricCI,
    PairwiseJudgment,
    RubricScores,
    write_result,
)

__all__ = ["JudgeOptions", "check_judge", "judge_eval", "judge_markdown", "judge_predictions"]

# ---------------------------------------------------------------- judging a predictions file


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a predictions JSONL; a bad line is one DataError naming the file, line, field."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: predictions file not found (medlora eval --metrics … writes it)")
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{file}:{number}: not JSON ({err.msg})") from None
        for field in ("question", "reference", "prediction"):
            if not isinstance(row.get(field), str):
                raise DataError(f"{file}:{number}: {field}: missing or not text")
        rows.append(row)
    if not rows:
        raise DataError(f"{file}: no prediction rows")
    return rows


def _ci(values: Sequence[float], seed: int) -> CI:
    return CI.model_validate(bootstrap_ci(values, seed=seed))


def summarize_pairs(
    letters: Sequence[tuple[str | None, str | None]], seed: int = 0
) -> PairwiseJudgment:
    """(letter with A = base, letter with A = tuned) per pair → rates of tuned vs base."""
    outcomes = [
        (pair_outcome(a, b), preference(a, False) == preference(b, True)) for a, b in letters
    ]
    parsed = [(outcome, agree) for outcome, agree in outcomes if outcome is not None]
    win, tie, loss = ([float(o == name) for o, _ in parsed] for name in ("win", "tie", "loss"))
    consistent = sum(agree for _, agree in parsed)
    return PairwiseJudgment(
        pairs=len(letters),
        unparseable=len(letters) - len(parsed),
        win=_ci(win, seed),
        tie=_ci(tie, seed),
        loss=_ci(loss, seed),
        win_minus_loss=CI.model_validate(paired_bootstrap_ci(win, loss, seed=seed)),
        consistent=consistent,
        position_consistency=consistent / len(parsed) if parsed else math.nan,
    )


def compare_scores(
    tuned: Sequence[float | None], base: Sequence[float | None] | None, seed: int = 0
) -> MetricCI:
    """Per-question scores (None: left out) → each model's mean and the paired difference over the
    questions both have."""
    model = _ci([t for t in tuned if t is not None], seed)
    if base is None:
        return MetricCI(model=model)
    both = [(t, b) for t, b in zip(tuned, base, strict=True) if t is not None and b is not None]
    diff = paired_bootstrap_ci([t for t, _ in both], [b for _, b in both], seed=seed)
    return MetricCI(
        model=model,
        base=_ci([b for b in base if b is not None], seed),
        diff=CI.model_validate(diff),
    )


def _share(letters: Sequence[str | None], wanted: str) -> float | None:
    parsed = [letter for letter in letters if letter is not None]
    return parsed.count(wanted) / len(parsed) if parsed else None


def _unparseable(marks: dict[str, list[list[str | None]]]) -> int:
    return sum(mark is None for side in marks.values() for question in side for mark in question)


Chat = list[dict[str, str]]
Verdicts = dict[str, list[list[str | None]]]  # side → question → one letter (None: unparseable)


def _add(chats: list[Chat], kind: str, **fields: str) -> int:
    """Queue one judge request; its index in `chats`."""
    chats.append(messages(kind, **fields))
    return len(chats) - 1


def _item_requests(
    chats: list[Chat],
    kind: str,
    sides: Sequence[str],
    questions: Sequence[tuple[dict[str, Any], list[str]]],
) -> dict[str, list[list[int]]]:
    """One `kind` request per (side, question row, item): side → question → request indices."""
    return {
        side: [
            [_add(chats, kind, question=row["question"], answer=row[side], item=i) for i in items]
            for row, items in questions
        ]
        for side in sides
    }


def _rubric_questions(
    rows: Sequence[dict[str, Any]], options: JudgeOptions
) -> tuple[list[RubricEntry], list[tuple[RubricEntry, dict[str, Any]]]]:
    """The rubric file's entries, and those whose question (by its text) is a predictions row."""
    entries = read_rubric(options.rubric) if options.rubric is not None else []
    by_question = {" ".join(row["question"].lower().split()): row for row in reversed(rows)}
    matched = [
        (entry, by_question[key])
        for entry in entries
        if (key := " ".join(entry.question.lower().split())) in by_question
    ]
    if entries and not matched:
        raise DataError(
            f"{options.rubric}: none of its {len(entries)} questions is among the predictions' "
            "questions (they are matched by their text)"
        )
    return entries, matched


def _verdicts(
    replies: Sequence[Reply], requests: dict[str, list[list[int]]], letters: Sequence[str]
) -> Verdicts:
    return {
        side: [[read_verdict(*replies[i], letters) for i in question] for question in questions]
        for side, questions in requests.items()
    }


def _fact_check(marks: Verdicts, statements: list[list[str]], options: JudgeOptions) -> FactCheck:
    def shares(wanted: str) -> MetricCI:
        per_side = {
            side: [_share(q, wanted) for q in questions] for side, questions in marks.items()
        }
        return compare_scores(per_side["prediction"], per_side.get("base_prediction"), options.seed)

    return FactCheck(
        questions=len(statements),
        statements=sum(map(len, statements)),
        max_statements=options.max_statements,
        unparseable=_unparseable(marks),
        recall=shares("C"),
        contradiction=shares("X"),
    )


def _rubric_scores(
    met: Verdicts,
    entries: list[RubricEntry],
    matched: list[tuple[RubricEntry, dict[str, Any]]],
    options: JudgeOptions,
) -> RubricScores:
    scores = {
        side: [
            None if None in q else rubric_score(entry.items, [m == "Y" for m in q])
            for (entry, _), q in zip(matched, questions, strict=True)
        ]
        for side, questions in met.items()
    }
    return RubricScores(
        file=str(options.rubric),
        questions=len(matched),
        unmatched=len(entries) - len(matched),
        unparseable=_unparseable(met),
        excluded=sum(score is None for side in scores.values() for score in side),
        score=compare_scores(scores["prediction"], scores.get("base_prediction"), options.seed),
    )


def judge_rows(
    rows: Sequence[dict[str, Any]],
    options: JudgeOptions,
    ask: Ask | None = None,
    predictions: str = "",
) -> JudgeResult:
    """Pairwise, reference facts and (with `options.rubric`) the rubric, in one batch of requests.

    `ask`: one request → reply (default: the `openai` client on `options.url`; tests pass a fake).
    Sides are "prediction" (tuned) and, when every row has one, "base_prediction"."""
    has_base = all(isinstance(row.get("base_prediction"), str) for row in rows)
    sides = ["prediction", "base_prediction"] if has_base else ["prediction"]
    chats: list[Chat] = []
    pairs = []
    for row in rows if has_base else []:
        shared = {"question": row["question"], "reference": row["reference"]}
        tuned, base = row["prediction"], row["base_prediction"]
        pairs.append(
            (
                _add(chats, "pair", **shared, a=base, b=tuned),
                _add(chats, "pair", **shared, a=tuned, b=base),
            )
        )
    statements = [reference_items(row["reference"], options.max_statements) for row in rows]
    facts = _item_requests(chats, "fact", sides, list(zip(rows, statements, strict=True)))
    entries, matched = _rubric_questions(rows, options)
    criteria = _item_requests(
        chats, "rubric", sides, [(row, [i.text for i in entry.items]) for entry, row in matched]
    )

    cache_path = options.cache or Path(predictions).parent / CACHE_NAME
    replies, sent = ask_all(chats, options, ask or openai_ask(options), cache_path)
    result = JudgeResult(
        judge_model=options.model,
        judge_url=api_base(options.url),
        predictions=predictions,
        examples=len(rows),
        requests=sent,
        cached=len(chats) - sent,
        cache=str(cache_path),
    )
    if pairs:
        letters = [
            (read_verdict(*replies[a], PAIR_LETTERS), read_verdict(*replies[b], PAIR_LETTERS))
            for a, b in pairs
        ]
        result.pairwise = summarize_pairs(letters, options.seed)
    if options.max_statements > 0:
        result.facts = _fact_check(_verdicts(replies, facts, FACT_LETTERS), statements, options)
    if matched:
        met = _verdicts(replies, criteria, RUBRIC_LETTERS)
        result.rubric = _rubric_scores(met, entries, matched, options)
    return result


def judge_predictions(
    path: str | Path, options: JudgeOptions, ask: Ask | None = None
) -> JudgeResult:
    """Judge an existing predictions JSONL (e.g. a demo run's predictions_unseen.jsonl)."""
    return judge_rows(read_predictions(path), options, ask, predictions=str(path))


def judge_eval(result: EvalResult, options: JudgeOptions, out: Path | None = None) -> EvalResult:
    """`medlora eval --judge`: judge the answers the eval just wrote; rewrite `out` with them."""
    if result.quality is None or not result.quality.predictions:
        raise ConfigError("--judge judges generated answers: add --metrics rouge (or f1, …)")
    result.judge = judge_predictions(result.quality.predictions, options)
    if out is not None:
        write_result(out, result)
    return result


# ---------------------------------------------------------------- markdown


def _num(value: float, signed: bool = False) -> str:
    return "–" if math.isnan(value) else f"{value:+.3f}" if signed else f"{value:.3f}"


def _fmt(ci: CI | None, signed: bool = False) -> str:
    if ci is None or math.isnan(ci.mean):
        return "–"
    return f"{_num(ci.mean, signed)} [{_num(ci.low, signed)}, {_num(ci.high, signed)}]"


def judge_markdown(result: JudgeResult) -> list[str]:
    """Markdown lines for a card, a report or a terminal: the judge, pairwise rates, consistency,
    unparseable counts, fact recall / contradiction per model, the rubric score."""
    lines = [
        f"judge: {result.judge_model} at {result.judge_url} ({result.examples} questions, "
        f"{result.requests} requests sent, {result.cached} verdicts from the cache)",
    ]
    pair = result.pairwise
    if pair is not None:
        parsed = pair.pairs - pair.unparseable
        lines += [
            "",
            "| tuned vs base, judged in both orders | share (95% CI) |",
            "|---|---|",
            f"| win | {_fmt(pair.win)} |",
            f"| tie (or the orders disagree) | {_fmt(pair.tie)} |",
            f"| loss | {_fmt(pair.loss)} |",
            f"| win − loss (paired) | {_fmt(pair.win_minus_loss, signed=True)} |",
            "",
            f"Position consistency: {_num(pair.position_consistency)} (both orders agree on "
            f"{pair.consistent} of {parsed} pairs); unparseable: {pair.unparseable} of "
            f"{pair.pairs} pairs, left out.",
        ]
    rows = []
    if result.facts is not None:
        rows += [("fact recall (statements covered)", result.facts.recall)]
        rows += [("contradiction rate (lower is better)", result.facts.contradiction)]
    if result.rubric is not None:
        rows += [(f"rubric score ({Path(result.rubric.file).name})", result.rubric.score)]
    if rows:
        lines += ["", "| per question, mean (95% CI) | base | tuned | tuned − base (paired) |"]
        lines += ["|---|---|---|---|"]
        for name, m in rows:
            lines.append(f"| {name} | {_fmt(m.base)} | {_fmt(m.model)} | {_fmt(m.diff, True)} |")
        lines.append("")
    if result.facts is not None:
        f = result.facts
        lines.append(
            f"Reference facts: {f.statements} statements from {f.questions} references (at most "
            f"{f.max_statements} each, first sentences), marked covered / contradicted / absent; "
            f"unparseable verdicts left out: {f.unparseable}."
        )
    if result.rubric is not None:
        r = result.rubric
        lines.append(
            f"Rubric: {r.questions} questions (HealthBench scoring: points met / positive points, "
            f"clipped to [0, 1]); {r.unmatched} not among the predictions; {r.unparseable} "
            f"unparseable item verdicts, {r.excluded} question scores left out for them."
        )
    return lines
