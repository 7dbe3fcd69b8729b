"""Scores on sources a run never trained on (`eval.unseen_sources`), base vs fine-tuned.

The demo's headline and `medlora sweep --unseen` both use this: the answer loss of the reference
answers, and the generated answers scored against them (ROUGE-L, token F1, MiniLM similarity,
repeated 4-grams, question echo) with paired 95% bootstrap intervals — the same questions, the same
generation settings, the base being the same weights with the adapter switched off. `medlora eval`
starts here too (`evaluate_run`): the asked split, and this panel beside it.
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
from medlora.errors import ConfigError, DataError
from medlora.evaluate.generate import recipe_generation
from medlora.evaluate.heldout import (
    EvalOptions,
    evaluate_heldout,
    load_eval_model,
    run_recipe,
    sampled_eval_records,
)
from medlora.evaluate.panels import score_panel
from medlora.evaluate.quality import METRICS, evaluate_answers
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


def score_run_unseen(
    recipe: Recipe, run_dir: Path, base: tuple[Any, Any], base_answers: dict[str, list[str]]
) -> dict[str, Any]:
    """A saved run's scores on eval.unseen_sources, its adapter put on `base` (an untouched model):
    loss and answer metrics, base vs tuned, as a mapping for a sweep's row.

    `base_answers` caches the base's answers by (questions, system prompt, generation settings): they
    do not depend on the adapter, so scoring several runs generates them once.
    Writes RUN/predictions_unseen.jsonl.
    """
    from peft import PeftModel

    records, specs = unseen_records(recipe)
    key = json.dumps(
        [[r.question for r in records], recipe.data.system_prompt, recipe.generation.model_dump()]
    )
    model, tokenizer = base
    model = PeftModel.from_pretrained(model, run_dir)
    predictions = Path(run_dir) / "predictions_unseen.jsonl"
    panel = score_panel(
        model, tokenizer, records, recipe, "unseen", specs, predictions, base_answers.get(key)
    )
    quality = panel.quality  # always scored here: a predictions path was given
    base_answers[key] = [answer.base_prediction for answer in quality.answers]
    return {
        "data": specs,
        "examples": panel.examples,
        "loss": round(panel.loss, 6),
        "base_loss": round(panel.base_loss, 6),
        "loss_change_pct": round(panel.loss_change_pct, 3),
        "generation": quality.generation,
        "metrics": quality.model_dump()["metrics"],
        "predictions": str(predictions),
    }


def evaluate_run(
    options: EvalOptions, model_and_tokenizer: tuple[Any, Any] | None = None
) -> EvalResult:
    """`medlora eval`: loss and/or answer quality on the asked split and, when comparing an adapter
    with its base, the second panel on the run's `eval.unseen_sources` (the same metrics and
    generation settings); one model load, one eval.json.

    `model_and_tokenizer`: the model already loaded with its adapter (else it is loaded here).
    """
    o = options
    if o.compare_base and o.adapter is None:
        raise ConfigError("--compare-base compares an adapter with its base: add --adapter RUN_DIR")
    recipe = run_recipe(o.adapter)
    loaded = load_eval_model(o.model, o.adapter, recipe, model_and_tokenizer)
    # The CLI's --batch-size and --max-new-tokens apply to both panels.
    recipe.eval.batch_size = o.batch_size or recipe.eval.batch_size
    recipe.generation = recipe_generation(recipe, o.max_new_tokens)
    adapter = str(o.adapter) if o.adapter else None
    result = EvalResult(model=o.model, adapter=adapter, data=o.data, split=o.split)
    if "loss" in o.metrics:
        result = evaluate_heldout(o, loaded)
    wanted = [m for m in o.metrics if m in METRICS]
    predictions = o.predictions or (o.out.parent if o.out else Path()) / "predictions.jsonl"
    if wanted:
        result.quality = evaluate_answers(
            *loaded,
            sampled_eval_records(o.data, o.split, recipe, o.column_map, o.limit),
            recipe.data.system_prompt,
            wanted,
            recipe.generation,
            recipe.eval.batch_size,
            o.compare_base,
            predictions,
            recipe.data.seed,
        )
    if o.unseen and o.compare_base and recipe.eval.unseen_sources:
        records, specs = unseen_records(recipe)
        recipe.eval.metrics = wanted  # type: ignore[misc]  # the split's metrics
        unseen_predictions = predictions.parent / "predictions_unseen.jsonl" if wanted else None
        result.unseen = score_panel(
            *loaded, records[: o.limit], recipe, "unseen", specs, unseen_predictions
        )
    if o.out is not None:
        write_result(o.out, result)
    return result
