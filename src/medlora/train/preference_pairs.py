"""Preference pairs (question, chosen, rejected) for `train.method: dpo | orpo`, and the margin
that measures them (train/preference.py trains on them).

Pairs (`train.preference_data`):
- `KIND:PATH` with KIND jsonl, json, parquet or hf: rows with `prompt`/`chosen`/`rejected` strings
  (the prompt is the user's question), or chat-style lists of {role, content} messages (chosen and
  rejected whole conversations, or a `prompt` message list with assistant-only chosen/rejected).
- `self` (SPIN-style): for the run's QA training records, chosen = the reference answer, rejected =
  the model's own greedy answer before this run, generated in batches and cached in
  RUN_DIR/preference_pairs.jsonl (rows keyed by record and generation settings, reused on rerun).
  `train.self_pairs_min_repetition` keeps only pairs whose rejected answer loops (its share of
  repeated word 4-grams), so DPO pushes against the loops rather than the answers' content.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlora.config import PREFERENCE_KINDS, Recipe
from medlora.data.format import format_record
from medlora.data.records import Record
from medlora.errors import DataError
from medlora.io import append_jsonl, write_jsonl_atomic

PAIRS_FILE = "preference_pairs.jsonl"
ROW_HINT = "preference rows need prompt, chosen and rejected strings (or chosen/rejected chat message lists)"


@dataclass
class PreferencePair:
    """One preference example: the user's question, the preferred and the dispreferred answer."""

    question: str
    chosen: str
    rejected: str
    id: str = ""


# ---------------------------------------------------------------------------------------------
# Reading preference files


def _content(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    value = message.get("content")
    return value.strip() if isinstance(value, str) else ""


def _question_and_answer(value: Any) -> tuple[str, str]:
    """(first user turn, last assistant turn) of a message list; ("", text) for a plain string."""
    if isinstance(value, str):
        return "", value.strip()
    if not isinstance(value, list):
        return "", ""
    question = next(
        (_content(m) for m in value if isinstance(m, dict) and m.get("role") == "user"), ""
    )
    answers = [_content(m) for m in value if isinstance(m, dict) and m.get("role") == "assistant"]
    return question, answers[-1] if answers else ""


def rows_to_pairs(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], where: str
) -> tuple[list[PreferencePair], dict[str, int]]:
    """Preference rows → pairs; a missing column is a DataError naming it, bad rows are counted."""
    present = set(columns)
    listed = ", ".join(columns) or "none"
    for column in ("chosen", "rejected"):
        if column not in present:
            raise DataError(f"{where}: missing column '{column}' (columns: {listed}); {ROW_HINT}")
    pairs: list[PreferencePair] = []
    skipped = Counter[str]()
    for index, row in enumerate(rows):
        prompt_question, _ = _question_and_answer(row.get("prompt"))
        if isinstance(row.get("prompt"), str):
            prompt_question = row["prompt"].strip()
        chosen_question, chosen = _question_and_answer(row.get("chosen"))
        _, rejected = _question_and_answer(row.get("rejected"))
        question = prompt_question or chosen_question
        if not question and "prompt" not in present:
            raise DataError(f"{where}: missing column 'prompt' (columns: {listed}); {ROW_HINT}")
        checks = {
            "empty_prompt": not question,
            "empty_chosen": not chosen,
            "empty_rejected": not rejected,
            "chosen_equals_rejected": chosen == rejected,
        }
        reason = next((name for name, failed in checks.items() if failed), None)
        if reason:
            skipped[reason] += 1
            continue
        row_id = row.get("id")
        pairs.append(PreferencePair(question, chosen, rejected, str(row_id or f"pair-{index}")))
    if not pairs:
        reasons = dict(skipped) or "no rows"
        raise DataError(f"{where}: no usable preference pair ({reasons}); {ROW_HINT}")
    return pairs, dict(skipped)


def load_preference_pairs(spec: str) -> tuple[list[PreferencePair], dict[str, int]]:
    """Pairs from `KIND:PATH` (jsonl, json, parquet or hf:DATASET_ID, its train split)."""
    from medlora.data.tabular import ROW_READERS, columns_of, read_hub

    kind, _, raw_path = spec.partition(":")
    kind, raw_path = kind.strip().lower(), raw_path.strip()
    if kind not in PREFERENCE_KINDS or not raw_path:
        raise DataError(
            f"train.preference_data={spec!r}: write KIND:PATH with KIND one of "
            f"{', '.join(PREFERENCE_KINDS)}, or self"
        )
    if kind == "hf":
        try:
            dataset = read_hub(raw_path)
        except DataError as err:
            raise DataError(f"train.preference_data={err}") from err
        return rows_to_pairs(list(dataset), list(dataset.column_names), f"hf:{raw_path}")
    import os

    path = Path(os.path.expanduser(os.path.expandvars(raw_path)))
    if not path.is_file():
        raise DataError(
            f"train.preference_data: {kind} file not found: {path}; check the path in {kind}:PATH"
        )
    rows = ROW_READERS[kind](path)
    if not rows:
        raise DataError(f"{path}: no rows found; {ROW_HINT}")
    return rows_to_pairs(rows, columns_of(rows), str(path))


# ---------------------------------------------------------------------------------------------
# Self-generated pairs (SPIN-style)


def pair_generation(recipe: Recipe) -> Any:
    """The generation settings of the rejected answers: the recipe's, with
    train.self_pairs_repetition_penalty in place of its repetition_penalty when set."""
    penalty = recipe.train.self_pairs_repetition_penalty
    if penalty is None:
        return recipe.generation
    return recipe.generation.model_copy(update={"repetition_penalty": penalty})


def _generate(model: Any, tokenizer: Any, questions: list[str], recipe: Recipe) -> list[str]:
    """Greedy answers on the model's device: the one call into medlora.evaluate.generate."""
    from medlora.evaluate.generate import generate_answers

    return generate_answers(
        model,
        tokenizer,
        questions,
        recipe.data.system_prompt,
        pair_generation(recipe),
        batch_size=recipe.eval.batch_size,
    )


def _pair_key(recipe: Recipe, record: Record) -> str:
    """Same key = same prompt, reference answer, model and generation settings: reuse the row."""
    parts = [
        recipe.model.name,
        recipe.model.revision,
        recipe.train.init_adapter,
        recipe.data.system_prompt,
        pair_generation(recipe).model_dump(),
        record.id,
        record.question,
        record.answer,
    ]
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()[:24]


def _read_cached_rows(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of an earlier (maybe interrupted) run by key; a half-written last line is ignored."""
    if not path.is_file():
        return {}
    rows: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("key"), str) and "rejected" in row:
            rows[row["key"]] = row
    return rows


def self_generated_pairs(
    model: Any, tokenizer: Any, records: Sequence[Record], recipe: Recipe, run_dir: Path
) -> tuple[list[PreferencePair], dict[str, int]]:
    """chosen = reference answer, rejected = the model's greedy answer; cached in PAIRS_FILE.

    Generated rows are appended batch by batch, so an interrupted run keeps what it made; at the
    end the file is rewritten with exactly this run's records, in order.
    """
    from medlora.progress import progress_bar

    path = run_dir / PAIRS_FILE
    keys = [_pair_key(recipe, record) for record in records]
    cached = _read_cached_rows(path)
    todo = [i for i, key in enumerate(keys) if key not in cached]
    if todo:
        chunk = max(recipe.eval.batch_size, 1) * 4
        with progress_bar() as progress:
            task = progress.add_task("rejected answers (greedy, self)", total=len(todo))
            for start in range(0, len(todo), chunk):
                indices = todo[start : start + chunk]
                answers = _generate(
                    model, tokenizer, [records[i].question for i in indices], recipe
                )
                for i, answer in zip(indices, answers, strict=True):
                    row = {
                        "key": keys[i],
                        "id": records[i].id,
                        "prompt": records[i].question,
                        "chosen": records[i].answer,
                        "rejected": answer,
                    }
                    cached[keys[i]] = row
                    append_jsonl(path, row)
                progress.advance(task, len(indices))
    rows = [cached[key] for key in keys]
    write_jsonl_atomic(path, rows)
    from medlora.evaluate.quality import repeated_ngram_share

    min_repetition = recipe.train.self_pairs_min_repetition
    pairs, skipped = [], Counter[str]()
    for row in rows:
        if row["rejected"].strip() == row["chosen"].strip():
            skipped["chosen_equals_rejected"] += 1
        elif min_repetition and repeated_ngram_share(row["rejected"]) < min_repetition:
            skipped["rejected_repeats_less"] += 1
        else:
            pairs.append(PreferencePair(row["prompt"], row["chosen"], row["rejected"], row["id"]))
    stats = {"generated": len(todo), "reused": len(rows) - len(todo), **skipped}
    return pairs, stats


# ---------------------------------------------------------------------------------------------
# Measuring


def preference_margins(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    system_prompt: str | None,
    max_seq_len: int,
    batch_size: int = 8,
) -> list[float]:
    """log p(chosen | prompt) − log p(rejected | prompt) per pair, summed over answer tokens.

    Rendered exactly as SFT trains (medlora.data.format); pairs whose answer is cut away entirely
    by `max_seq_len` are left out.
    """
    from medlora.evaluate.loss import score_examples

    examples = []
    for pair in pairs:
        answers = (pair.chosen, pair.rejected)
        records = [Record(pair.id, pair.question, answer, "pref") for answer in answers]
        chosen, rejected = [
            format_record(tokenizer, r, system_prompt, max_seq_len) for r in records
        ]
        if chosen is not None and rejected is not None:
            examples += [chosen, rejected]
    scored = score_examples(model, examples, tokenizer.pad_token_id, batch_size)
    sums = [
        loss * example.answer_tokens
        for loss, example in zip(scored["per_example_loss"], examples, strict=True)
    ]
    # Losses are negative log-probs: margin = NLL(rejected) − NLL(chosen).
    return [sums[i + 1] - sums[i] for i in range(0, len(sums), 2)]
