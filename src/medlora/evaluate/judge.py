"""`medlora eval --judge`: base and tuned answers judged by a model behind any OpenAI-compatible chat
API (vLLM, a hosted API, or `medlora serve` itself).

The input is a predictions JSONL (`evaluate_answers` writes it: question, reference, prediction and,
with `--compare-base`, base_prediction). Three judgments:
- pairwise: each pair asked in both orders (A = base, then A = tuned); orders that disagree make a
  tie, which cancels the judge's preference for a position. Win / tie / loss of tuned vs base with
  bootstrap intervals, win − loss paired, and the share of pairs whose orders agree;
- reference facts (HealthBench / MedScore style): each reference cut into at most 8 statements,
  each marked covered / contradicted / absent in each answer: fact recall and contradiction rate
  per model (per-question shares), and the paired difference;
- a user rubric file, scored as HealthBench does (`judge_prompts.rubric_score`).
Every request asks for one letter (judge_prompts.py); a reply that is no allowed letter is counted
and left out, never guessed. Replies are cached (judge_client.py), so a rerun sends no request.

Why the `openai` client rather than inspect-ai: inspect-ai is an evaluation framework with its own
task / solver / scorer / log model and a large dependency tree (not in this environment; its docs
reach OpenAI-compatible servers through its own provider layer and log files). This needs a few
hundred single-token chat requests with log-probabilities, a cache and our own result types;
`openai` is already a dependency and brings the timeout and retries.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from medlora.errors import ConfigError, DataError
from medlora.evaluate.judge_client import (
    CACHE_NAME,
    Ask,
    Chat,
    JudgeOptions,
    api_base,
    ask_all,
    check_judge,
    openai_ask,
)
from medlora.evaluate.judge_prompts import (
    PROMPTS,
    RubricEntry,
    messages,
    pair_outcome,
    preference,
    read_rows,
    read_rubric,
    read_verdict,
    reference_items,
    rubric_score,
)
from medlora.evaluate.quality import bootstrap_ci, paired_bootstrap_ci
from medlora.results import (
    EvalResult,
    FactCheck,
    JudgeResult,
    MetricCI,
    PairwiseJudgment,
    RubricScores,
    write_result,
)

__all__ = ["JudgeOptions", "check_judge", "judge_eval", "judge_predictions"]

# The row fields that hold each model's answer: tuned, then base (when every row has one).
SIDES = ("prediction", "base_prediction")
Verdicts = dict[str, list[list[str | None]]]  # side → question → one letter (None: unparseable)


class PredictionRow(BaseModel):
    """What the judge reads of a predictions JSONL row (the texts of `results.ScoredAnswer`)."""

    model_config = ConfigDict(strict=True)
    question: str
    reference: str
    prediction: str
    base_prediction: str | None = None


def read_predictions(path: str | Path) -> list[PredictionRow]:
    """The rows of a predictions JSONL (`medlora eval --metrics …` writes it)."""
    return read_rows(path, PredictionRow, '{"question": ..., "reference": ..., "prediction": ...}')


# ---------------------------------------------------------------- verdicts → rates


def summarize_pairs(letters: Sequence[Sequence[str | None]]) -> PairwiseJudgment:
    """(letter with A = base, letter with A = tuned) per pair → rates of tuned vs base."""
    parsed = [
        (outcome, preference(a, False) == preference(b, True))
        for a, b in letters
        if (outcome := pair_outcome(a, b)) is not None
    ]
    win, tie, loss = ([float(o == name) for o, _ in parsed] for name in ("win", "tie", "loss"))
    consistent = sum(agree for _, agree in parsed)
    return PairwiseJudgment(
        pairs=len(letters),
        unparseable=len(letters) - len(parsed),
        win=bootstrap_ci(win),
        tie=bootstrap_ci(tie),
        loss=bootstrap_ci(loss),
        win_minus_loss=paired_bootstrap_ci(win, loss),
        consistent=consistent,
        position_consistency=consistent / len(parsed) if parsed else math.nan,
    )


def compare_scores(per_side: dict[str, list[float | None]]) -> MetricCI:
    """Per-question scores of each side (None: left out) → each model's mean and the paired
    difference over the questions both have."""
    tuned, base = per_side["prediction"], per_side.get("base_prediction")
    model = bootstrap_ci([t for t in tuned if t is not None])
    if base is None:
        return MetricCI(model=model)
    both = [(t, b) for t, b in zip(tuned, base, strict=True) if t is not None and b is not None]
    return MetricCI(
        model=model,
        base=bootstrap_ci([b for b in base if b is not None]),
        diff=paired_bootstrap_ci([t for t, _ in both], [b for _, b in both]),
    )


def _unparseable(verdicts: Verdicts) -> int:
    return sum(v is None for questions in verdicts.values() for q in questions for v in q)


def _share(letters: list[str | None], wanted: str) -> float | None:
    parsed = [letter for letter in letters if letter is not None]
    return parsed.count(wanted) / len(parsed) if parsed else None


def fact_check(marks: Verdicts, statements: list[list[str]], max_statements: int) -> FactCheck:
    """Statement verdicts (C / X / N) → per-question fact recall and contradiction rate."""

    def shares(wanted: str) -> MetricCI:
        return compare_scores({side: [_share(q, wanted) for q in qs] for side, qs in marks.items()})

    return FactCheck(
        questions=len(statements),
        statements=sum(map(len, statements)),
        max_statements=max_statements,
        unparseable=_unparseable(marks),
        recall=shares("C"),
        contradiction=shares("X"),
    )


def rubric_scores(
    met: Verdicts, entries: list[RubricEntry], matched: list[RubricEntry], rubric: Path
) -> RubricScores:
    """Item verdicts (Y / N) → HealthBench scores; a question with an unparseable item is left out."""
    scores = {
        side: [
            None if None in q else rubric_score(entry.items, [m == "Y" for m in q])
            for entry, q in zip(matched, questions, strict=True)
        ]
        for side, questions in met.items()
    }
    return RubricScores(
        file=str(rubric),
        questions=len(matched),
        unmatched=len(entries) - len(matched),
        unparseable=_unparseable(met),
        excluded=sum(score is None for side in scores.values() for score in side),
        score=compare_scores(scores),
    )


# ---------------------------------------------------------------- judging a predictions file


def _matched_rubric(
    rows: Sequence[PredictionRow], rubric: Path | None
) -> tuple[list[RubricEntry], list[tuple[RubricEntry, PredictionRow]]]:
    """The rubric file's entries, and those whose question (by its text) is a predictions row."""
    entries = read_rubric(rubric) if rubric is not None else []
    by_question = {" ".join(row.question.lower().split()): row for row in reversed(rows)}
    matched = [
        (entry, by_question[key])
        for entry in entries
        if (key := " ".join(entry.question.lower().split())) in by_question
    ]
    if entries and not matched:
        raise DataError(
            f"{rubric}: none of its {len(entries)} questions is among the predictions' "
            "questions (they are matched by their text)"
        )
    return entries, matched


def judge_rows(
    rows: Sequence[PredictionRow | dict[str, Any]],
    options: JudgeOptions,
    ask: Ask | None = None,
    predictions: str = "",
) -> JudgeResult:
    """Pairwise, reference facts and (with `options.rubric`) the rubric, in one batch of requests.

    `ask`: one request → reply (default: the `openai` client on `options.url`; tests pass a fake).
    Sides are "prediction" (tuned) and, when every row has one, "base_prediction"."""
    rows = [PredictionRow.model_validate(row) for row in rows]
    sides = SIDES if all(row.base_prediction is not None for row in rows) else SIDES[:1]
    statements = [reference_items(row.reference, options.max_statements) for row in rows]
    entries, matched = _matched_rubric(rows, options.rubric)
    # Every request, each tagged (kind, side, question index) for its verdict.
    requests: list[tuple[tuple[str, str, int], Chat]] = []
    for i, row in enumerate(rows):
        orders = [(row.base_prediction, row.prediction), (row.prediction, row.base_prediction)]
        for a, b in orders if len(sides) == 2 else []:  # each pair as A = base, then A = tuned
            chat = messages("pair", question=row.question, reference=row.reference, a=a, b=b)
            requests.append((("pair", "", i), chat))
        for side in sides:
            for item in statements[i]:
                chat = messages("fact", question=row.question, answer=getattr(row, side), item=item)
                requests.append((("fact", side, i), chat))
    for i, (entry, row) in enumerate(matched):
        for side in sides:
            for criterion in entry.items:
                answer = getattr(row, side)
                chat = messages("rubric", question=row.question, answer=answer, item=criterion.text)
                requests.append((("rubric", side, i), chat))

    cache_path = options.cache or Path(predictions).parent / CACHE_NAME
    chats = [chat for _, chat in requests]
    replies, sent = ask_all(chats, options, ask or openai_ask(options), cache_path)
    letters: dict[tuple[str, str, int], list[str | None]] = defaultdict(list)
    for ((kind, side, i), _), reply in zip(requests, replies, strict=True):
        letters[kind, side, i].append(read_verdict(*reply, PROMPTS[kind][1]))

    def verdicts(kind: str, questions: int) -> Verdicts:
        return {side: [letters[kind, side, i] for i in range(questions)] for side in sides}

    result = JudgeResult(
        judge_model=options.model,
        judge_url=api_base(options.url),
        predictions=predictions,
        examples=len(rows),
        requests=sent,
        cached=len(chats) - sent,
        cache=str(cache_path),
    )
    # Only the parts judged are set: the others stay out of the written file.
    if len(sides) == 2:
        result.pairwise = summarize_pairs([letters["pair", "", i] for i in range(len(rows))])
    if options.max_statements > 0:
        marks = verdicts("fact", len(rows))
        result.facts = fact_check(marks, statements, options.max_statements)
    if matched and options.rubric is not None:
        met = verdicts("rubric", len(matched))
        result.rubric = rubric_scores(met, entries, [e for e, _ in matched], options.rubric)
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
