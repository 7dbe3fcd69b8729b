"""`medlora eval`: answer-only loss and perplexity on a held-out split, base and adapter in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medlora.config import Recipe, load_recipe
from medlora.data.clean import clean_records
from medlora.data.format import Example, format_records
from medlora.data.hygiene import apply_hygiene
from medlora.data.prepare import load_splits
from medlora.data.records import Record
from medlora.data.sample import sample_records
from medlora.data.sources import load_source
from medlora.data.split import split_by_topic
from medlora.errors import DataError
from medlora.evaluate.generate import adapter_disabled, adapter_merged
from medlora.evaluate.loss import score_examples
from medlora.io import write_json_atomic
from medlora.models import load_model, load_with_adapter

SPLITS = ("test", "validation", "train", "all")


def run_recipe(adapter_dir: str | Path | None) -> Recipe:
    """The recipe a run was trained with (its prompt and lengths), or the defaults without a run."""
    if adapter_dir is not None and (Path(adapter_dir) / "recipe.yaml").is_file():
        return load_recipe(Path(adapter_dir) / "recipe.yaml")
    return Recipe()


def load_eval_records(
    data: str,
    split: str,
    recipe: Recipe,
    column_map: dict[str, str] | None = None,
) -> list[Record]:
    """Records of one split: from a prepared folder, or from a source split as `prepare` would."""
    if split not in SPLITS:
        raise DataError(f"--split {split!r} is not one of {', '.join(SPLITS)}")
    folder = Path(data)
    if folder.is_dir() and (folder / "test.jsonl").is_file():
        splits = load_splits(folder)
    else:
        records, _ = load_source(data, column_map=column_map, strict=recipe.data.strict)
        records, _ = clean_records(records)
        # The same answer hygiene as training data, so references are judged as targets were.
        records, _ = apply_hygiene(records, recipe.data.clean)
        if split == "all":
            return records
        splits = split_by_topic(records, recipe.data.val_fraction, recipe.data.test_fraction)
    if split == "all":
        return [r for name in ("train", "validation", "test") for r in splits[name]]
    return splits[split]


def sampled_eval_records(
    data: str,
    split: str,
    recipe: Recipe,
    column_map: dict[str, str] | None = None,
    limit: int | None = None,
) -> list[Record]:
    """The split's records, `limit` of them sampled with the recipe's seed; never an empty list."""
    records = sample_records(
        load_eval_records(data, split, recipe, column_map), limit, recipe.data.seed
    )
    if not records:
        raise DataError(f"{data}: the {split!r} split is empty; try --split all")
    return records


def load_eval_model(
    model_spec: str,
    adapter_dir: str | Path | None,
    recipe: Recipe,
    model_and_tokenizer: tuple[Any, Any] | None = None,
) -> tuple[Any, Any]:
    """`(model, tokenizer)` to evaluate: the one given (loaded once by the caller), else the base
    with the run's adapter, else the base alone, in the recipe's dtype."""
    if model_and_tokenizer is not None:
        return model_and_tokenizer
    if adapter_dir is not None:
        return load_with_adapter(model_spec, adapter_dir, recipe.model.dtype)
    return load_model(model_spec, recipe.model.dtype)


def score_model(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    batch_size: int,
    compare_base: bool,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Score the model (with its adapter) and, when asked, the same weights with it switched off.

    The base goes first, on the untouched weights; the adapter is then folded in for speed.
    `precision`: the recipe's `eval.precision`.
    """
    pad = tokenizer.pad_token_id
    base = None
    if compare_base:
        with adapter_disabled(model):
            base = score_examples(model, examples, pad, batch_size, precision=precision)
    with adapter_merged(model):
        result = score_examples(model, examples, pad, batch_size, precision=precision)
    if base is not None:
        result["base_loss"] = base["loss"]
        result["base_perplexity"] = base["perplexity"]
        result["base_per_example_loss"] = base["per_example_loss"]
        result["loss_change"] = result["loss"] - base["loss"]
    return result


def evaluate_heldout(
    model_spec: str,
    data: str,
    adapter_dir: str | Path | None = None,
    split: str = "test",
    limit: int | None = None,
    compare_base: bool = False,
    out: str | Path | None = None,
    batch_size: int | None = None,
    column_map: dict[str, str] | None = None,
    model_and_tokenizer: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    recipe = run_recipe(adapter_dir)
    records = sampled_eval_records(data, split, recipe, column_map, limit)
    model, tokenizer = load_eval_model(model_spec, adapter_dir, recipe, model_and_tokenizer)
    examples, stats = format_records(
        tokenizer, records, recipe.data.system_prompt, recipe.data.max_seq_len
    )
    if not examples:
        raise DataError(
            f"{data}: no example keeps an answer token at max_seq_len={recipe.data.max_seq_len}"
        )
    scores = score_model(
        model,
        tokenizer,
        examples,
        batch_size or recipe.eval.batch_size,
        compare_base and adapter_dir is not None,
        recipe.eval.precision,
    )
    result = {
        "model": model_spec,
        "adapter": str(adapter_dir) if adapter_dir else None,
        "data": data,
        "split": split,
        **{k: v for k, v in scores.items() if not k.endswith("per_example_loss")},
        "dropped_no_answer_tokens": stats.dropped_no_answer_tokens,
        "truncated": stats.truncated,
        "per_example": [
            {"id": e.record_id, "source": e.source, "loss": loss}
            | (
                {"base_loss": scores["base_per_example_loss"][i]}
                if "base_per_example_loss" in scores
                else {}
            )
            for i, (e, loss) in enumerate(zip(examples, scores["per_example_loss"], strict=True))
        ],
    }
    if out is not None:
        write_json_atomic(out, result)
    return result
