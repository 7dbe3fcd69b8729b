"""Scores on sources a run never trained on (`eval.unseen_sources`), base vs fine-tuned.

The demo's headline and `medlora sweep --unseen` both use this: the answer loss of the reference
answers, and the generated answers scored against them (ROUGE-L, token F1, MiniLM similarity,
repeated 4-grams, question echo) with paired 95% bootstrap intervals — the same questions, the same
generation settings, the base being the same weights with the adapter switched off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medlora.config import Recipe
from medlora.data.clean import clean_records
from medlora.data.format import format_records
from medlora.data.hygiene import apply_hygiene
from medlora.data.medquad import find_medquad_dir
from medlora.data.records import Record
from medlora.data.sample import sample_records
from medlora.data.sources import load_source, parse_source
from medlora.errors import DataError
from medlora.evaluate.heldout import score_model
from medlora.evaluate.quality import evaluate_answers
from medlora.io import read_jsonl


def unseen_records(recipe: Recipe) -> tuple[list[Record], list[str]]:
    """The recipe's never-trained-on sources, cleaned like training data, sampled to max_examples.

    A bare `medquad:NAME` is a collection folder of the MedQuAD checkout the run trained on.
    """
    records: list[Record] = []
    specs: list[str] = []
    for spec in recipe.eval.unseen_sources:
        kind, path = parse_source(spec)
        if kind == "medquad" and path is not None and not Path(path).exists():
            spec = f"medquad:{find_medquad_dir() / path}"
        loaded, _ = load_source(spec, strict=recipe.data.strict)
        records += loaded
        specs.append(spec)
    records, _ = clean_records(records)
    records, _ = apply_hygiene(records, recipe.data.clean)
    if recipe.eval.unseen_sources and not records:
        raise DataError(f"eval.unseen_sources {recipe.eval.unseen_sources} hold no questions")
    return sample_records(records, recipe.eval.max_examples, recipe.data.seed), specs


def loss_base_vs_tuned(
    model: Any, tokenizer: Any, records: list[Record], recipe: Recipe
) -> dict[str, Any]:
    """Answer-token loss of the references, with the adapter and without it (same examples)."""
    examples, _ = format_records(
        tokenizer, records, recipe.data.system_prompt, recipe.data.max_seq_len
    )
    scores = score_model(
        model, tokenizer, examples, recipe.eval.batch_size, True, recipe.eval.precision
    )
    keys = ("loss", "base_loss", "perplexity", "base_perplexity", "answer_tokens")
    out = {key: scores[key] for key in keys}
    out["examples"] = len(examples)
    out["loss_change_pct"] = (scores["loss"] - scores["base_loss"]) / scores["base_loss"] * 100
    out["examples_better"] = sum(
        t < b
        for t, b in zip(scores["per_example_loss"], scores["base_per_example_loss"], strict=True)
    )
    return out


def score_unseen(
    model: Any,
    tokenizer: Any,
    records: list[Record],
    specs: list[str],
    recipe: Recipe,
    predictions_path: Path,
    base_predictions: list[str] | None = None,
) -> dict[str, Any]:
    """Loss and answer metrics, base vs tuned, on the unseen records.

    `base_predictions` (the base's answers to the same questions under the same generation
    settings, e.g. from an earlier run of a sweep) skips generating them again: they do not depend
    on the adapter.
    """
    scores: dict[str, Any] = {
        "data": specs,
        **loss_base_vs_tuned(model, tokenizer, records, recipe),
    }
    scores["quality"] = evaluate_answers(
        model,
        tokenizer,
        records,
        recipe.data.system_prompt,
        recipe.eval.metrics,
        recipe.generation,
        recipe.eval.batch_size,
        compare_base=True,
        predictions_path=predictions_path,
        seed=recipe.data.seed,
        base_predictions=base_predictions,
    )
    return scores


def score_run_unseen(
    recipe: Recipe, run_dir: Path, base: tuple[Any, Any], base_answers: dict[str, list[str]]
) -> dict[str, Any]:
    """A saved run's scores on eval.unseen_sources, its adapter put on `base` (an untouched model).

    `base_answers` caches the base's answers by (questions, system prompt, generation settings), so
    scoring several runs generates them once. Writes RUN/predictions_unseen.jsonl.
    """
    from peft import PeftModel

    records, specs = unseen_records(recipe)
    key = json.dumps(
        [[r.question for r in records], recipe.data.system_prompt, recipe.generation.model_dump()]
    )
    model, tokenizer = base
    model = PeftModel.from_pretrained(model, run_dir)
    predictions = Path(run_dir) / "predictions_unseen.jsonl"
    scores = score_unseen(
        model, tokenizer, records, specs, recipe, predictions, base_answers.get(key)
    )
    base_answers[key] = [row["base_prediction"] for row in read_jsonl(predictions)]
    quality = scores["quality"]
    return {
        "data": specs,
        "examples": scores["examples"],
        "loss": round(scores["loss"], 6),
        "base_loss": round(scores["base_loss"], 6),
        "loss_change_pct": round(scores["loss_change_pct"], 3),
        "generation": quality["generation"],
        "metrics": quality["metrics"],
        "predictions": str(predictions),
    }
