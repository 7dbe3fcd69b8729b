"""`medlora compare`: the same questions to the base and the fine-tuned model, side by side.

Writes compare.json (the data), compare.md and compare.html (self-contained). Both answers come from
one loaded model, the adapter switched off for the base, with the run's chat template and greedy decoding.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medlora.config import GenerationConfig
from medlora.data.records import Record
from medlora.data.sample import sample_records
from medlora.data.tabular import read_csv, read_json, read_jsonl, read_text
from medlora.errors import DataError
from medlora.evaluate.quality import METRICS, aggregate, score_answers
from medlora.io import write_text_atomic
from medlora.report.format import fmt
from medlora.report.render import render
from medlora.results import CompareResult, CompareRow, write_result

QUESTION_KEYS = ("question", "instruction")
ANSWER_KEYS = ("answer", "reference", "output")


def _record(row: dict[str, Any], index: int, where: str) -> Record:
    question = next((row[k] for k in QUESTION_KEYS if k in row and row[k]), None)
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: row {index + 1} has no 'question' text; every row needs one")
    answer = next((row[k] for k in ANSWER_KEYS if k in row and isinstance(row[k], str)), "")
    return Record(
        id=str(row["id"] if "id" in row else index),
        question=question.strip(),
        answer=answer.strip(),
        source=Path(where).name,
    )


def read_questions(path: str | os.PathLike[str]) -> list[Record]:
    """Questions (with optional reference answers) from .txt (one per line), .jsonl, .json or .csv."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"--questions {file}: file not found")
    suffix = file.suffix.lower()
    if suffix == ".txt":
        lines = [line.strip() for line in read_text(file).splitlines() if line.strip()]
        return [
            Record(id=str(i), question=q, answer="", source=file.name) for i, q in enumerate(lines)
        ]
    # The same readers (and one-line errors) as training data: medlora.data.tabular.
    readers = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv}
    if suffix not in readers:
        raise DataError(f"--questions {file}: use a .txt, .jsonl, .json or .csv file")
    rows = readers[suffix](file)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{file}: expected rows of objects with a 'question' field")
    return [_record(row, i, str(file)) for i, row in enumerate(rows)]


def compare_answers(
    model: Any,
    tokenizer: Any,
    records: list[Record],
    system_prompt: str | None,
    settings: GenerationConfig | None = None,
    batch_size: int = 4,
    metrics: tuple[str, ...] = METRICS,
) -> CompareResult:
    """Tuned and base answers to the same questions, scored where a reference answer exists."""
    from medlora.evaluate.generate import adapter_disabled, adapter_merged, generate_answers

    settings = settings or GenerationConfig()
    max_new_tokens = settings.max_new_tokens
    questions = [r.question for r in records]
    # The base first, on the untouched weights; then the adapter folded in for speed.
    with adapter_disabled(model):
        base = generate_answers(
            model, tokenizer, questions, system_prompt, settings, batch_size, "base answers"
        )
    with adapter_merged(model):
        tuned = generate_answers(
            model, tokenizer, questions, system_prompt, settings, batch_size, "fine-tuned answers"
        )
    rows = [
        {"id": r.id, "question": r.question, "reference": r.answer, "base": b, "tuned": t}
        for r, b, t in zip(records, base, tuned, strict=True)
    ]
    scored = [i for i, r in enumerate(records) if r.answer]
    summary: dict[str, Any] = {}  # per metric: the base's, the tuned model's, the difference
    if scored:
        refs = [records[i].answer for i in scored]
        asked = [records[i].question for i in scored]
        tuned_scores = score_answers([tuned[i] for i in scored], refs, metrics, asked)
        base_scores = score_answers([base[i] for i in scored], refs, metrics, asked)
        for name in tuned_scores:
            for j, i in enumerate(scored):
                rows[i][f"tuned_{name}"] = tuned_scores[name][j]
                rows[i][f"base_{name}"] = base_scores[name][j]
        summary = aggregate(tuned_scores, base_scores)
    return CompareResult.model_validate(
        {
            "n": len(rows),
            "scored": len(scored),
            "max_new_tokens": max_new_tokens,
            "decoding": "sampling" if settings.do_sample else "greedy",
            "generation": settings.model_dump(),
            "rows": rows,
            "metrics": summary,
        }
    )


MD_NAMES = {
    "rougeL": "ROUGE-L",
    "f1": "token F1",
    "similarity": "similarity",
    "repetition": "repeated 4-grams (lower is better)",
    "echo": "question echo (lower is better)",
}


def _scores(row: CompareRow, side: str) -> str:
    """`ROUGE-L 0.412, token F1 0.500, …` for the "base" or "tuned" answer."""
    return ", ".join(f"{MD_NAMES[k]} {fmt(v)}" for k, v in row.scores(side).items())


def render_markdown(result: CompareResult) -> str:
    return render("compare.md.j2", r=result, names=MD_NAMES, scores=_scores)


def write_compare(result: CompareResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    out = Path(out_dir)
    return {
        "json": write_result(out / "compare.json", result),
        "md": write_text_atomic(out / "compare.md", render_markdown(result)),
        "html": write_text_atomic(
            out / "compare.html", render("compare.html.j2", r=result, names=MD_NAMES)
        ),
    }


def run_compare(
    model_spec: str,
    adapter: str | os.PathLike[str],
    questions: str | os.PathLike[str] | None = None,
    from_split: str | None = None,
    n: int = 20,
    out_dir: str | os.PathLike[str] | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 4,
    model_and_tokenizer: tuple[Any, Any] | None = None,
) -> CompareResult:
    """Load base + adapter once, answer `n` questions with each, write compare.{json,md,html}."""
    from medlora.evaluate.generate import recipe_generation
    from medlora.evaluate.heldout import run_recipe
    from medlora.models import load_with_adapter

    if (questions is None) == (from_split is None):
        raise DataError(
            "give either --questions FILE or --from-split SPLIT (test, validation, train)"
        )
    recipe = run_recipe(adapter)
    if questions is not None:
        records, origin = read_questions(questions), str(questions)
    else:
        from medlora.data.prepare import load_splits

        if not (Path(adapter) / "data" / "test.jsonl").is_file():
            raise DataError(
                f"{adapter}/data holds no prepared splits (trained with --data elsewhere?): "
                "give --questions FILE instead"
            )
        splits = load_splits(Path(adapter) / "data")
        if from_split not in splits:
            raise DataError(f"--from-split {from_split!r}: choose test, validation or train")
        records, origin = splits[from_split], f"the run's {from_split} split"
    records = sample_records(records, n, recipe.data.seed)
    if not records:
        raise DataError(f"no questions in {origin}")
    model, tokenizer = model_and_tokenizer or load_with_adapter(
        model_spec, adapter, recipe.model.dtype
    )
    result = compare_answers(
        model,
        tokenizer,
        records,
        recipe.data.system_prompt,
        recipe_generation(recipe, max_new_tokens),
        batch_size,
    )
    result = result.model_copy(
        update={"model": model_spec, "adapter": str(adapter), "questions_from": origin}
    )
    files = write_compare(result, out_dir or adapter)
    return result.model_copy(update={"files": {k: str(v) for k, v in files.items()}})
