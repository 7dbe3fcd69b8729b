"""`run_sweep`: train one run per axis value on a fresh base, score each saved adapter on the
shared validation split (and the unseen sources with `--unseen`), then write the tables."""

from __future__ import annotations

import copy
import gc
import json
import math
import time
from pathlib import Path
from typing import Any

from medlora.config import Recipe
from medlora.errors import ConfigError, DataError
from medlora.io import write_json_atomic
from medlora.models import load_recipe_model
from medlora.sweep.plan import (
    PER_RUN_DATA_KEYS,
    SweepPlan,
    SweepResult,
    plan_sweep,
    run_dir_name,
)
from medlora.sweep.tables import describe_row, write_sweep_files


def adapter_parameter_count(run_dir: Path) -> int:
    """Trainable parameters = the tensors of the saved adapter (read from its header only)."""
    from safetensors import safe_open

    with safe_open(str(run_dir / "adapter_model.safetensors"), framework="pt") as handle:
        names = handle.keys()  # safe_open is not a mapping
        return sum(math.prod(handle.get_slice(name).get_shape()) for name in names)


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Bases:
    """Fresh, never-adapted base models: copies of one loaded model, or reloads where a copy can't be
    made (quantized weights live on the GPU in bitsandbytes' own tensors) or the axis is the model."""

    def __init__(self, plan: SweepPlan) -> None:
        self.pristine: Any = None
        self.tokenizer: Any = None
        first = plan.recipes[0]
        if not plan.key.startswith("model.") and first.model.quantization == "none":
            self.pristine, self.tokenizer = load_recipe_model(first, training=False)

    def fresh(self, recipe: Recipe, training: bool) -> tuple[Any, Any]:
        if self.pristine is not None:
            return copy.deepcopy(self.pristine), self.tokenizer
        return load_recipe_model(recipe, training)


def validation_loss(
    recipe: Recipe, data_dir: Path, run_dir: Path, base: tuple[Any, Any]
) -> dict[str, Any]:
    """Score the run's saved adapter on the validation examples training used (same sample, as
    `medlora eval --split validation` would): the row's `val_*` figures, None where no example
    keeps an answer token."""
    import torch
    from peft import PeftModel

    from medlora.evaluate.heldout import EvalOptions, evaluate_heldout

    model, tokenizer = base
    model = PeftModel.from_pretrained(model, run_dir)
    if recipe.model.quantization == "none" and torch.cuda.is_available():
        model.to("cuda")  # score where training ran
    limit = recipe.data.max_val_examples
    options = EvalOptions(
        model=recipe.model.name,
        data=str(data_dir),
        adapter=run_dir,
        split="validation",
        limit=limit,
    )
    try:
        scored = evaluate_heldout(options, (model, tokenizer))
    except DataError:  # an empty split, or no example keeps an answer token
        return dict.fromkeys(("val_loss", "val_perplexity", "val_examples", "val_answer_tokens"))
    return {
        "val_loss": round(scored.loss, 6),
        "val_perplexity": round(scored.perplexity, 4),
        "val_examples": scored.examples,
        "val_answer_tokens": scored.answer_tokens,
    }


def _earlier_row(run_dir: Path, recipe: Recipe) -> dict[str, Any] | None:
    """A finished run of the same resolved recipe is reused (an interrupted sweep goes on)."""
    path = run_dir / "sweep_row.json"
    if not path.is_file() or not (run_dir / "adapter_model.safetensors").is_file():
        return None
    row = json.loads(path.read_text(encoding="utf-8"))
    return row if row.get("recipe_yaml") == recipe.to_yaml() else None


def _check(plan: SweepPlan, unseen: bool) -> None:
    """Refuse what cannot run before anything is loaded or written."""
    from medlora.models import check_quantization

    if unseen and not all(r.eval.unseen_sources for r in plan.recipes):
        raise ConfigError(
            "--unseen scores eval.unseen_sources and the recipe has none: add e.g. "
            "--set 'eval.unseen_sources=[medquad:9_CDC_QA]' (and keep them out with data.exclude)"
        )
    for recipe in plan.recipes:
        check_quantization(recipe.model.quantization)  # refuse QLoRA without CUDA before any load


def _command(
    recipe_path: str | Path | None,
    overrides: list[str],
    out: Path,
    prepared_dir: str | Path | None,
    unseen: bool,
) -> str:
    """The `medlora sweep` call, as a user would type it again."""
    words = ["medlora sweep", str(recipe_path or ""), "--unseen" if unseen else ""]
    if prepared_dir:
        words.append(f"--data {prepared_dir}")
    for item in overrides:
        quote = any(c in item for c in " []{}'\"*?")
        words.append(f"--set '{item}'" if quote else f"--set {item}")
    words.append(f"--out {out}")
    return " ".join(" ".join(words).split())


def _train_run(
    plan: SweepPlan, index: int, run_dir: Path, shared: Path | None, bases: _Bases, console: Any
) -> dict[str, Any]:
    """Train one run from a fresh base, score its saved adapter on the validation split, and write
    its row to RUN/sweep_row.json."""
    from medlora.train import prepare_run_data, train

    recipe = plan.recipes[index]
    model, tokenizer = bases.fresh(recipe, training=True)
    data_dir = shared or prepare_run_data(recipe, run_dir / "data", tokenizer)
    trained = train(recipe, run_dir, prepared_dir=data_dir, model_and_tokenizer=(model, tokenizer))
    del model  # the adapted copy; the next run starts from the untouched base
    _free_memory()
    with console.status(f"{run_dir.name}: scoring the validation split…"):
        val = validation_loss(recipe, data_dir, run_dir, bases.fresh(recipe, training=False))
    _free_memory()
    row = {
        "value": plan.values[index],
        "run_dir": str(run_dir),
        "trainable_params": adapter_parameter_count(run_dir),
        **val,
        "train_loss": trained.train_loss,
        "trainer_eval_loss": trained.eval_loss,
        "steps": trained.steps,
        "train_time_s": trained.runtime_s,
        "tokens_per_s": trained.tokens_per_s,
        "trained_tokens": trained.trained_tokens,
        "recipe_yaml": recipe.to_yaml(),
    }
    write_json_atomic(run_dir / "sweep_row.json", row)
    return row


def run_sweep(
    recipe_path: str | Path | None,
    overrides: list[str],
    out_dir: str | Path,
    *,
    prepared_dir: str | Path | None = None,
    fresh: bool = False,
    unseen: bool = False,
    console: Any = None,
) -> SweepResult:
    """Train one run per axis value (see the module docstring); returns the rows and files written."""
    from rich.console import Console

    from medlora.evaluate.unseen import score_run_unseen
    from medlora.train import prepare_run_data

    console = console or Console(stderr=True)
    plan = plan_sweep(recipe_path, overrides)
    _check(plan, unseen)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bases = _Bases(plan)
    pristine = bases.pristine  # the base's size, for each run's share of trainable parameters
    base_params = sum(p.numel() for p in pristine.parameters()) if pristine is not None else None
    shared: Path | None = Path(prepared_dir) if prepared_dir else None
    if shared is None and plan.key not in PER_RUN_DATA_KEYS:
        # The data split once for the whole sweep: the same validation set scores every run.
        with console.status("preparing data once for all runs…"):
            shared = prepare_run_data(plan.recipes[0], out / "data", bases.tokenizer)

    command = _command(recipe_path, overrides, out, prepared_dir, unseen)
    result = SweepResult(plan.key, out, plan.fixed, command=command)
    base_answers: dict[str, list[str]] = {}  # the base's unseen-source answers, per question set
    walls: list[float] = []
    total = len(plan.recipes)
    for i, (raw, recipe) in enumerate(zip(plan.raw_values, plan.recipes, strict=True)):
        run_dir = out / run_dir_name(plan.key, raw)
        label = f"[{i + 1}/{total}] {plan.key}={raw}"
        row = None if fresh else _earlier_row(run_dir, recipe)
        if row is not None:
            console.print(f"{label}: finished earlier, reusing {run_dir}", highlight=False)
        else:
            eta = f" (≈{sum(walls) / len(walls) * (total - i) / 60:.1f} min left)" if walls else ""
            console.rule(f"{label}{eta}")
            started = time.perf_counter()
            row = _train_run(plan, i, run_dir, shared, bases, console)
            walls.append(time.perf_counter() - started)
        if unseen and row.get("unseen") is None:
            console.print(f"{label}: scoring the unseen sources…", highlight=False)
            base = bases.fresh(recipe, training=False)  # the run's adapter goes onto it
            row["unseen"] = score_run_unseen(recipe, run_dir, base, base_answers)
            del base
            _free_memory()
            write_json_atomic(run_dir / "sweep_row.json", row)
        if base_params:
            row["trainable_pct"] = round(100.0 * row["trainable_params"] / base_params, 4)
        result.rows.append(row)
        console.print(f"{label}: {describe_row(row)}", highlight=False)

    for row in result.rows:
        row.pop("recipe_yaml", None)  # kept in each run's sweep_row.json and recipe.yaml
    write_sweep_files(result)
    return result
