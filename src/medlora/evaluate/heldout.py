"""`medlora eval`'s options, and its answer-only loss and perplexity on a held-out split, base and
adapter in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from medlora.config import Recipe
from medlora.data.clean import clean_records
from medlora.data.format import Example, format_records
from medlora.data.hygiene import apply_hygiene
from medlora.data.prepare import load_splits
from medlora.data.records import Record
from medlora.data.sample import sample_records
from medlora.data.sources import load_source
from medlora.data.split import split_by_topic
from medlora.errors import DataError
from medlora.evaluate.generate import adapter_disabled, adapter_merged, run_recipe
from medlora.evaluate.loss import score_examples
from medlora.evaluate.quality import paired_bootstrap_ci
from medlora.models import load_model, load_with_adapter
from medlora.results import EvalResult

SPLITS = ("test", "validation", "train", "all")


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
        result |= {f"base_{key}": base[key] for key in ("loss", "perplexity", "per_example_loss")}
        result["loss_change"] = result["loss"] - base["loss"]
    return result


class EvalOptions(BaseModel):
    """What `medlora eval` scores and where it writes (the CLI's options, as one object)."""

    model: str  # model spec: Hub id, folder, .gguf or alias
    data: str  # KIND:PATH or a prepared folder
    adapter: Path | None = None  # run directory with the adapter
    split: str = "test"
    limit: int | None = None  # score at most this many examples
    compare_base: bool = False  # also score the base model (the adapter switched off)
    out: Path | None = None  # eval.json
    batch_size: int | None = None  # default: the recipe's eval.batch_size
    column_map: dict[str, str] | None = None
    metrics: list[str] = ["loss"]  # loss and/or evaluate.quality.METRICS
    max_new_tokens: int | None = None  # default: the recipe's generation settings
    predictions: Path | None = None  # per-example answers (default: beside `out`)
    unseen: bool = True  # with compare_base: also the run's eval.unseen_sources (second panel)


def evaluate_heldout(
    options: EvalOptions, model_and_tokenizer: tuple[Any, Any] | None = None
) -> EvalResult:
    """`medlora eval`'s loss figures: the split's answer loss, per example too, and the base's."""
    o = options
    recipe = run_recipe(o.adapter)
    records = sampled_eval_records(o.data, o.split, recipe, o.column_map, o.limit)
    model, tokenizer = load_eval_model(o.model, o.adapter, recipe, model_and_tokenizer)
    examples, stats = format_records(
        tokenizer, records, recipe.data.system_prompt, recipe.data.max_seq_len
    )
    if not examples:
        raise DataError(
            f"{o.data}: no example keeps an answer token at max_seq_len={recipe.data.max_seq_len}"
        )
    scores = score_model(
        model,
        tokenizer,
        examples,
        o.batch_size or recipe.eval.batch_size,
        o.compare_base and o.adapter is not None,
        recipe.eval.precision,
    )
    losses = scores.pop("per_example_loss")
    per_example = [
        {"id": e.record_id, "source": e.source, "loss": loss}
        for e, loss in zip(examples, losses, strict=True)
    ]
    base_losses = scores.pop("base_per_example_loss", None)  # when the base was scored
    if base_losses is not None:
        for row, base_loss in zip(per_example, base_losses, strict=True):
            row["base_loss"] = base_loss
        # The token-weighted loss has no per-example form; its paired interval is given for
        # the mean of per-example losses instead (same questions, resampled together).
        scores["example_loss_change"] = paired_bootstrap_ci(
            losses, base_losses, seed=recipe.data.seed
        )
    return EvalResult(
        model=o.model,
        adapter=str(o.adapter) if o.adapter else None,
        data=o.data,
        split=o.split,
        **scores,
        dropped_no_answer_tokens=stats.dropped_no_answer_tokens,
        truncated=stats.truncated,
        per_example=per_example,
    )
