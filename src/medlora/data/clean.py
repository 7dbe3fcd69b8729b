"""Text normalisation and de-duplication, run on all sources together before splitting."""

from __future__ import annotations

import dataclasses
import functools
import html
import re
import unicodedata
from collections.abc import Iterable

from medlora.data.records import Record

_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
_BLANK_LINES = re.compile(r"\n{3,}")
_NOT_WORD = re.compile(r"[\W_]+")


def normalize_text(text: str) -> str:
    """Readable, comparable text that keeps the layout of lists and paragraphs.

    HTML entities are decoded, Unicode is NFC, every run of spaces/tabs/no-break spaces becomes
    one space, each line is stripped, single newlines (list items) are kept, two or more blank
    lines become one paragraph break, and the ends are stripped.
    """
    raw = text
    text = unicodedata.normalize("NFC", html.unescape(text))
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n")
    if not text.isascii():  # skip the regex on plain-ASCII text (most of it): cleaning stays fast
        text = _ZERO_WIDTH.sub("", text)
    # str.split() with no argument splits on every Unicode space (no-break, narrow, tabs, …).
    lines = (" ".join(line.split()) for line in text.split("\n"))
    text = _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
    # Already-clean text (most of it) stays one string, not two equal copies in memory.
    return raw if text == raw else text


def _loose_key(text: str) -> str:
    # Case, punctuation and spacing differences do not make a new example.
    return " ".join(_NOT_WORD.sub(" ", text.casefold()).split())


def clean_records(records: Iterable[Record]) -> tuple[list[Record], dict[str, int]]:
    """Normalised copies without empty or duplicate pairs (first one kept, order unchanged)."""
    counts = {"empty_after_normalization": 0, "duplicate_exact": 0, "duplicate_normalized": 0}
    exact: set[tuple[str, str]] = set()
    # Loose question key → answers kept for it. Long answers are only loosened (memoised) when
    # their question collides: most never are, which keeps cleaning fast.
    loose: dict[str, list[str]] = {}
    loose_answer = functools.cache(_loose_key)
    kept: list[Record] = []
    for record in records:
        question, answer = normalize_text(record.question), normalize_text(record.answer)
        if not question or not answer:
            counts["empty_after_normalization"] += 1
            continue
        if (question, answer) in exact:
            counts["duplicate_exact"] += 1
            continue
        loose_question = _loose_key(question)
        answers = loose.get(loose_question)
        if answers is None:
            loose[loose_question] = [answer]
        else:
            key = loose_answer(answer)
            if any(loose_answer(seen) == key for seen in answers):
                counts["duplicate_normalized"] += 1
                continue
            answers.append(answer)
        exact.add((question, answer))
        kept.append(
            dataclasses.replace(
                record,
                question=question,
                answer=answer,
                topic=normalize_text(record.topic),
                meta=dict(record.meta),
            )
        )
    return kept, counts
