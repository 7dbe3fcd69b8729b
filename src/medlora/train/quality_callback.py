"""Quality during training: every N steps, answer a fixed sample of validation questions (ROUGE-L, F1,
similarity) and score a fixed sample of a multiple-choice benchmark; log both with the losses.

The scores go through `Trainer.log`, so they land in metrics.jsonl (and any other sink) beside loss and
eval_loss. With `eval.best_metric`, any logged metric picks the adapter: each new best is saved to
RUN_DIR/best/ (with best.json saying which step and value), and at the end of training its weights are
put back into the model, so the adapter `train` saves is the best one, not merely the last.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from medlora.config import Recipe
from medlora.data.records import Record
from medlora.data.sample import sample_records
from medlora.io import move_files_atomic, write_json_atomic


def metric_mode(name: str, mode: str = "auto") -> str:
    """min for losses and perplexities, max for everything else (accuracy, ROUGE, F1, …)."""
    if mode != "auto":
        return mode
    return "min" if ("loss" in name or "perplexity" in name) else "max"


class QualityCallback(TrainerCallback):
    """See the module docstring; built from `recipe.eval` for one trainer (`attach_quality_callback`)."""

    def __init__(
        self, trainer: Any, recipe: Recipe, run_dir: Path, tokenizer: Any, val_records: list[Record]
    ) -> None:
        e = recipe.eval
        self.trainer = trainer
        self.tokenizer = tokenizer
        self.run_dir = Path(run_dir)
        self.every = e.during_training_every
        self.records = (
            sample_records(val_records, e.during_training_examples, recipe.data.seed)
            if self.every
            else []
        )
        self.system_prompt = recipe.data.system_prompt
        self.metrics = tuple(e.during_training_metrics)
        self.generation = recipe.generation.model_copy(
            update={"max_new_tokens": e.during_training_max_new_tokens}
        )
        self.benchmark: tuple[str, dict[str, Any]] | None = None
        if self.every and e.during_training_benchmark:
            from medlora.evaluate.harness import task_units
            from medlora.evaluate.multiple_choice_sets import load_benchmark

            bench = load_benchmark(e.during_training_benchmark, e.during_training_benchmark_data)
            items = sample_records(bench.items, e.during_training_benchmark_limit, recipe.data.seed)
            self.benchmark = (bench.task, task_units(bench, items, 0))
        self.best_metric = e.best_metric
        self.best_mode = metric_mode(e.best_metric or "", e.best_metric_mode)
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.recipe_yaml = recipe.to_yaml()
        self.last_scored_step = -1

    # -------------------------------------------------------------- scoring

    def score(self, model: Any) -> dict[str, float]:
        """Quality and benchmark means on the fixed samples (model put back in its mode after)."""
        from medlora.evaluate.generate import generate_answers
        from medlora.evaluate.quality import score_answers

        was_training = model.training
        model.eval()
        logs: dict[str, float] = {}
        try:
            if self.records:
                answers = generate_answers(
                    model,
                    self.tokenizer,
                    [r.question for r in self.records],
                    self.system_prompt,
                    self.generation,
                    batch_size=len(self.records),
                    show_progress=False,
                )
                scores = score_answers(answers, [r.answer for r in self.records], self.metrics)
                for name, values in scores.items():
                    logs[f"quality_{name}"] = sum(values) / len(values)
            if self.benchmark is not None:
                from medlora.evaluate.harness import score_items

                task, units = self.benchmark
                rows = score_items(model, self.tokenizer, units)
                logs[f"bench_{task}_acc"] = sum(r["acc"] for r in rows) / len(rows)
                logs[f"bench_{task}_acc_norm"] = sum(r["acc_norm"] for r in rows) / len(rows)
        finally:
            model.train(was_training)
        return logs

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        if self.every and state.global_step % self.every == 0 and model is not None:
            self._score_and_log(model, state)

    def on_train_end(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        # Score the final weights too, so the last point of the curve is the adapter `train` saves.
        if self.every and model is not None and self.last_scored_step != state.global_step:
            self._score_and_log(model, state)
        if self.best_metric and self.best_step is not None and model is not None:
            self._restore_best(model)

    def _score_and_log(self, model: Any, state: Any) -> None:
        self.last_scored_step = state.global_step
        logs = self.score(model)
        if logs:  # → on_log of every callback: metrics.jsonl, best tracking, sinks
            self.trainer.log(logs)

    # -------------------------------------------------------------- best adapter

    def on_log(
        self,
        args: Any,
        state: Any,
        control: Any,
        logs: Any = None,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        if not self.best_metric or not logs or self.best_metric not in logs or model is None:
            return
        value = logs[self.best_metric]
        if not isinstance(value, int | float) or not math.isfinite(value):
            return
        better = self.best_value is None or (
            value < self.best_value if self.best_mode == "min" else value > self.best_value
        )
        if better:
            self.best_value, self.best_step = float(value), state.global_step
            if state.is_world_process_zero:  # every process tracks the best; one writes it
                self._save_best(model)

    def _save_best(self, model: Any) -> None:
        """The adapter, tokenizer and recipe into RUN_DIR/best/ (a loadable run directory)."""
        target = self.run_dir / "best"
        scratch = self.run_dir / ".best.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        model.save_pretrained(scratch)
        self.tokenizer.save_pretrained(scratch)
        (scratch / "recipe.yaml").write_text(self.recipe_yaml, encoding="utf-8")
        move_files_atomic(scratch, target)
        write_json_atomic(
            self.run_dir / "best.json",
            {
                "metric": self.best_metric,
                "mode": self.best_mode,
                "value": self.best_value,
                "step": self.best_step,
                "path": "best",
            },
        )

    def _restore_best(self, model: Any) -> None:
        from accelerate import PartialState
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        PartialState().wait_for_everyone()  # the main process may still be writing best/
        weights = self.run_dir / "best" / "adapter_model.safetensors"
        if weights.is_file():
            set_peft_model_state_dict(model, load_file(str(weights)))


def attach_quality_callback(
    trainer: Any, recipe: Recipe, run_dir: Path, tokenizer: Any, val_records: list[Record]
) -> QualityCallback:
    """Build the callback from `recipe.eval` and hook it to `trainer` (called by `sft_fit`)."""
    callback = QualityCallback(trainer, recipe, run_dir, tokenizer, val_records)
    trainer.add_callback(callback)
    if trainer.is_world_process_zero():
        # A stale best.json would name another run's adapter.
        (run_dir / "best.json").unlink(missing_ok=True)
    return callback
