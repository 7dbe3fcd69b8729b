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
from medlora.data.hygiene import apply_hygiene
from medlora.data.medquad import find_medquad_dir
from medlora.data.records import Record
from medlora.data.sample import sample_records
from medlora.data.sources import load_source, parse_source
from medlora.errors import DataError
from medlora.evaluate.panels import score_panel
from medlora.evaluate.quality import METRICS, EvalOptions, evaluate_run
from medlora.io import read_jsonl
from medlora.results import EvalResult, write_result


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


def score_unseen(
    model: Any,
    tokenizer: Any,
    records: list[Record],
    specs: list[str],
    recipe: Recipe,
    predictions_path: Path,
    base_predictions: list[str] | None = None,
) -> dict[str, Any]:
    """Loss and answer metrics, base vs tuned, on the unseen records (the `unseen` panel as a
    mapping, for the sweep's tables).

    `base_predictions` (the base's answers to the same questions under the same generation
    settings, e.g. from an earlier run of a sweep) skips generating them again: they do not depend
    on the adapter.
    """
    panel = score_panel(
        model, tokenizer, records, recipe, "unseen", specs, predictions_path, base_predictions
    )
    return panel.model_dump()


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


def evaluate_with_unseen(options: EvalOptions, unseen: bool = True) -> EvalResult:
    """`medlora eval`: the asked split (`evaluate_run`) and, beside it, the second panel on the
    run's `eval.unseen_sources` when comparing an adapter with its base — the same metrics and
    generation settings, one model load, one eval.json."""
    from medlora.evaluate.heldout import load_eval_model, run_recipe

    recipe = run_recipe(options.adapter)
    wanted = unseen and options.compare_base and bool(recipe.eval.unseen_sources)
    if not wanted:
        return evaluate_run(options)
    loaded = load_eval_model(options.model, options.adapter, recipe)
    beside = options.out.parent if options.out else Path()
    split_predictions = options.predictions or beside / "predictions.jsonl"
    # eval.json is written once, below, with both panels; the answers go where they always did.
    split_options = options.model_copy(update={"out": None, "predictions": split_predictions})
    result = evaluate_run(split_options, loaded)
    records, specs = unseen_records(recipe)
    if options.limit is not None:
        records = records[: options.limit]
    predictions = None
    if any(m in METRICS for m in options.metrics):
        predictions = split_predictions.parent / "predictions_unseen.jsonl"
    # The split's settings: the CLI's --batch-size and --max-new-tokens apply to both panels.
    recipe = recipe.model_copy(deep=True)
    recipe.eval.metrics = [m for m in options.metrics if m in METRICS]  # type: ignore[misc]
    if options.batch_size:
        recipe.eval.batch_size = options.batch_size
    if options.max_new_tokens:
        recipe.generation.max_new_tokens = options.max_new_tokens
    result.unseen = score_panel(*loaded, records, recipe, "unseen", specs, predictions)
    if options.out is not None:
        write_result(options.out, result)
    return result
