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
from medlora.errors import ConfigError
from medlora.io import write_json_atomic
from medlora.results import TrainSummary
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

    total = 0
    with safe_open(str(run_dir / "adapter_model.safetensors"), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            total += math.prod(handle.get_slice(name).get_shape())
    return total


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Bases:
    """Fresh, never-adapted base models: copies of one loaded model, or reloads where a copy can't be
    made (quantized weights live on the GPU in bitsandbytes' own tensors) or the axis is the model."""

    def __init__(self, plan: SweepPlan, given: tuple[Any, Any] | None) -> None:
        first = plan.recipes[0].model
        self.per_run = plan.key.startswith("model.")
        self.pristine: Any = None
        self.tokenizer: Any = None
        if given is not None:
            self.pristine, self.tokenizer = given
        elif not self.per_run and first.quantization == "none":
            self.pristine, self.tokenizer = self._load(plan.recipes[0], training=False)

    @staticmethod
    def _load(recipe: Recipe, training: bool) -> tuple[Any, Any]:
        from medlora.models import load_recipe_model

        return load_recipe_model(recipe, training)

    def fresh(self, recipe: Recipe, training: bool) -> tuple[Any, Any]:
        if self.pristine is not None and not self.per_run:
            return copy.deepcopy(self.pristine), self.tokenizer
        return self._load(recipe, training)

    def parameter_count(self) -> int | None:
        if self.pristine is None:
            return None
        return sum(p.numel() for p in self.pristine.parameters())


def validation_loss(
    recipe: Recipe, data_dir: Path, run_dir: Path, base: tuple[Any, Any]
) -> dict[str, Any] | None:
    """Score the run's saved adapter on the validation examples training used (same sample)."""
    import torch
    from peft import PeftModel

    from medlora.data.format import format_records
    from medlora.data.prepare import load_splits
    from medlora.data.sample import sample_records
    from medlora.evaluate.loss import score_examples

    d = recipe.data
    records = sample_records(load_splits(data_dir)["validation"], d.max_val_examples, d.seed)
    model, tokenizer = base
    examples, _ = format_records(tokenizer, records, d.system_prompt, d.max_seq_len)
    if not examples:
        return None
    model = PeftModel.from_pretrained(model, run_dir)
    if recipe.model.quantization == "none" and torch.cuda.is_available():
        model.to("cuda")  # score where training ran
    e = recipe.eval
    scored = score_examples(
        model, examples, tokenizer.pad_token_id, e.batch_size, precision=e.precision
    )
    return {k: scored[k] for k in ("loss", "perplexity", "examples", "answer_tokens")}


def _row_for(
    plan: SweepPlan, index: int, run_dir: Path, result: TrainSummary, val: dict[str, Any] | None
) -> dict[str, Any]:
    recipe = plan.recipes[index]
    return {
        "value": plan.values[index],
        "run_dir": str(run_dir),
        "trainable_params": adapter_parameter_count(run_dir),
        "val_loss": None if val is None else round(val["loss"], 6),
        "val_perplexity": None if val is None else round(val["perplexity"], 4),
        "val_examples": None if val is None else val["examples"],
        "val_answer_tokens": None if val is None else val["answer_tokens"],
        "train_loss": result.train_loss,
        "trainer_eval_loss": result.eval_loss,
        "steps": result.steps,
        "train_time_s": result.runtime_s,
        "tokens_per_s": result.tokens_per_s,
        "trained_tokens": result.trained_tokens,
        "recipe_yaml": recipe.to_yaml(),
    }


def _earlier_row(run_dir: Path, recipe: Recipe) -> dict[str, Any] | None:
    """A finished run of the same resolved recipe is reused (an interrupted sweep goes on)."""
    path = run_dir / "sweep_row.json"
    if not path.is_file() or not (run_dir / "adapter_model.safetensors").is_file():
        return None
    row = json.loads(path.read_text(encoding="utf-8"))
    return row if row.get("recipe_yaml") == recipe.to_yaml() else None


def run_sweep(
    recipe_path: str | Path | None,
    overrides: list[str],
    out_dir: str | Path,
    *,
    prepared_dir: str | Path | None = None,
    model_and_tokenizer: tuple[Any, Any] | None = None,
    fresh: bool = False,
    unseen: bool = False,
    console: Any = None,
) -> SweepResult:
    """Train one run per axis value (see the module docstring); returns the rows and files written.

    `model_and_tokenizer` is the untouched base to copy for every run (it is never adapted itself).
    """
    from rich.console import Console

    from medlora.evaluate.unseen import score_run_unseen
    from medlora.models import check_quantization
    from medlora.train import prepare_run_data, train

    console = console or Console(stderr=True)
    plan = plan_sweep(recipe_path, overrides)
    if unseen and not all(r.eval.unseen_sources for r in plan.recipes):
        raise ConfigError(
            "--unseen scores eval.unseen_sources and the recipe has none: add e.g. "
            "--set 'eval.unseen_sources=[medquad:9_CDC_QA]' (and keep them out with data.exclude)"
        )
    for recipe in plan.recipes:
        check_quantization(recipe.model.quantization)  # refuse QLoRA without CUDA before any load
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bases = _Bases(plan, model_and_tokenizer)
    base_params = bases.parameter_count()
    shared: Path | None = Path(prepared_dir) if prepared_dir else None
    if shared is None and plan.key not in PER_RUN_DATA_KEYS:
        # The data split once for the whole sweep: the same validation set scores every run.
        with console.status("preparing data once for all runs…"):
            shared = prepare_run_data(plan.recipes[0], out / "data", bases.tokenizer)

    sets = " ".join(f"--set {_quoted(item)}" for item in overrides)
    data = f"--data {prepared_dir} " if prepared_dir else ""
    command = (
        f"medlora sweep {recipe_path or ''} {'--unseen ' if unseen else ''}{data}{sets} --out {out}"
    )
    result = SweepResult(plan.key, out, command=" ".join(command.split()))
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
            run_started = time.perf_counter()
            model, tokenizer = bases.fresh(recipe, training=True)
            data_dir = shared or prepare_run_data(recipe, run_dir / "data", tokenizer)
            trained = train(
                recipe, run_dir, prepared_dir=data_dir, model_and_tokenizer=(model, tokenizer)
            )
            del model  # the adapted copy; the next run starts from the untouched base
            _free_memory()
            with console.status(f"{label}: scoring the validation split…"):
                val = validation_loss(
                    recipe, data_dir, run_dir, bases.fresh(recipe, training=False)
                )
            _free_memory()
            row = _row_for(plan, i, run_dir, trained, val)
            write_json_atomic(run_dir / "sweep_row.json", row)
            walls.append(time.perf_counter() - run_started)
        if unseen and row.get("unseen") is None:
            console.print(f"{label}: scoring the unseen sources…", highlight=False)
            base = bases.fresh(recipe, training=False)
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
    result.files = write_sweep_files(result, plan)
    return result


def _quoted(item: str) -> str:
    return item if all(c not in item for c in " []{}'\"*?") else "'" + item + "'"
