"""What the judge is asked and how its one-letter replies are read (used by evaluate/judge.py).

Every question to the judge asks for ONE letter, each a single token in every BPE vocabulary we
serve (SmolLM2, Llama 3, Qwen, GPT-4o's): pairwise A / B / T (tie), reference facts C (covered) /
X (contradicted) / N (absent), rubric items Y (met) / N (not met). A reply is read from the
log-probabilities first (the allowed letter with the highest log-probability among the returned
top ones), else from the text when it is exactly an allowed letter, else it is unparseable (None):
a weak judge that says "Sure, ..." is counted as unparseable, never guessed.

Long texts are cut at `MAX_WORDS` words (marked "…") so a prompt fits a small server's context
(`medlora serve` refuses prompts over `--max-prompt-tokens`, 1024 by default).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, Field, ValidationError, field_validator

from medlora.errors import DataError

MAX_WORDS = 200  # per text in a prompt
MAX_FACT_ITEMS = 8  # statements taken from each reference (its first sentences)
MIN_ITEM_WORDS = 3  # shorter pieces ("Yes.", "Symptoms:") are headings or fragments, not facts

SYSTEM_PROMPT = (
    "You are a careful medical expert who grades answers to health questions. "
    "You reply with exactly one capital letter and nothing else."
)
PAIR_PROMPT = """Question: {question}

Reference answer written by medical experts: {reference}

Answer A: {a}

Answer B: {b}

Which answer is more accurate, complete and helpful, judged against the reference answer? \
Ignore which one comes first and how long it is. Reply with one letter: A if Answer A is better, \
B if Answer B is better, T if they are equally good."""
FACT_PROMPT = """Question: {question}

Answer: {answer}

Statement from the reference answer: {item}

Does the answer support this statement? Reply with one letter: C if the answer states or clearly \
implies it (covered), X if the answer says something that contradicts it, N if the answer does not \
mention it."""
RUBRIC_PROMPT = """Question: {question}

Answer: {answer}

Criterion: {item}

Does the answer meet this criterion? Reply with one letter: Y if it does, N if it does not."""
# The prompts as one test-visible table: kind → (template, allowed letters).
PROMPTS = {
    "pair": (PAIR_PROMPT, ("A", "B", "T")),
    "fact": (FACT_PROMPT, ("C", "X", "N")),
    "rubric": (RUBRIC_PROMPT, ("Y", "N")),
}

_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")
_ABBREVIATIONS = ("e.g.", "i.e.", "Dr.", "vs.", "approx.", "St.")
_TEXT_NOISE = " \t\n.*()[]'\"`:"


def cut(text: str, max_words: int = MAX_WORDS) -> str:
    words = text.split()
    return " ".join(words) if len(words) <= max_words else " ".join(words[:max_words]) + " …"


def messages(kind: str, **fields: str) -> list[dict[str, str]]:
    """The chat messages for one question of `kind` ("pair", "fact", "rubric")."""
    template, _ = PROMPTS[kind]
    user = template.format(**{name: cut(value) for name, value in fields.items()})
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def read_verdict(
    top: Sequence[tuple[str, float]], text: str | None, letters: Sequence[str]
) -> str | None:
    """The allowed letter with the highest log-probability among `top`, else the reply's text
    when it is one allowed letter (spaces, quotes, "*" and "." around it ignored), else None."""
    scored = [(logprob, token.strip()) for token, logprob in top if token.strip() in letters]
    if scored:
        return max(scored, key=lambda pair: pair[0])[1]  # the first of equals, as listed
    reply = (text or "").strip(_TEXT_NOISE)
    return reply if reply in letters else None


def preference(verdict: str | None, tuned_is_a: bool) -> str | None:
    """A pairwise letter as "tuned", "base" or "tie" (None stays None)."""
    if verdict is None:
        return None
    if verdict == "T":
        return "tie"
    return "tuned" if (verdict == "A") == tuned_is_a else "base"


def pair_outcome(base_first: str | None, tuned_first: str | None) -> str | None:
    """Both orders' letters → "win" / "loss" / "tie" of tuned vs base; orders that disagree are a
    tie (the pair's preference was its position); None when either letter is unparseable.

    `base_first`: the letter for A = base, B = tuned; `tuned_first`: for A = tuned, B = base."""
    first, second = preference(base_first, False), preference(tuned_first, True)
    if first is None or second is None:
        return None
    if first != second:
        return "tie"  # the orders disagree: the pair's preference was its position
    return {"tuned": "win", "base": "loss", "tie": "tie"}[first]


def reference_items(reference: str, max_items: int = MAX_FACT_ITEMS) -> list[str]:
    """A reference as short statements: split at sentence ends (. ! ? then a space) and line
    breaks, list markers stripped, pieces under MIN_ITEM_WORDS words dropped, the first `max_items`
    kept. Deterministic and crude (a few abbreviations such as "e.g." do not end a sentence; others
    do): the judge sees each piece whole."""
    pieces: list[str] = []
    for piece in _SENTENCE_BREAK.split(reference):
        if pieces and pieces[-1].endswith(_ABBREVIATIONS):  # "e.g. a GP" is one sentence
            pieces[-1] += " " + piece
        else:
            pieces.append(piece)
    stripped = (piece.strip(" \t-•*") for piece in pieces)
    items = [cut(piece, 60) for piece in stripped if len(piece.split()) >= MIN_ITEM_WORDS]
    return items[:max_items]


# ---------------------------------------------------------------- JSONL files the judge reads


class RubricItem(BaseModel):
    """One criterion; negative points mark something an answer should not do."""

    text: str = Field(min_length=1)
    points: float

    @field_validator("points")
    @classmethod
    def _nonzero(cls, points: float) -> float:
        if points == 0:
            raise ValueError("must not be 0 (positive: wanted, negative: unwanted)")
        return points


class RubricEntry(BaseModel):
    """One rubric line: a question and its criteria."""

    question: str = Field(min_length=1)
    items: list[RubricItem] = Field(min_length=1)

    @field_validator("items")
    @classmethod
    def _some_positive(cls, items: list[RubricItem]) -> list[RubricItem]:
        if not any(item.points > 0 for item in items):
            raise ValueError("need at least one item with positive points (the score's maximum)")
        return items


Row = TypeVar("Row", bound=BaseModel)


def read_rows(path: str | Path, row_type: type[Row], want: str) -> list[Row]:
    """A JSONL file as `row_type` rows (blank lines skipped); a bad line is one DataError naming the
    file, line and field, with `want` (the expected shape) as the hint."""
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"{file}: cannot read it ({err.strerror}); want {want} per line") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(row_type.model_validate_json(line))
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(part) for part in first["loc"])
            message = first["msg"].removeprefix("Value error, ")
            where = f"{field}: " if field else ""
            raise DataError(f"{file}:{number}: {where}{message} (want {want})") from None
    if not rows:
        raise DataError(f"{file}: no rows (want {want} per line)")
    return rows


def read_rubric(path: str | Path) -> list[RubricEntry]:
    """A rubric JSONL file: {"question": ..., "items": [{"text": ..., "points": 5}]} per line."""
    return read_rows(path, RubricEntry, '{"question": ..., "items": [{"text": ..., "points": 5}]}')


def rubric_score(items: Sequence[RubricItem], met: Sequence[bool]) -> float:
    """HealthBench's score of one answer: points of the items met / the positive points possible,
    clipped to [0, 1] (an unwanted item met subtracts its points)."""
    possible = sum(item.points for item in items if item.points > 0)
    achieved = sum(item.points for item, hit in zip(items, met, strict=True) if hit)
    return min(max(achieved / possible, 0.0), 1.0)
