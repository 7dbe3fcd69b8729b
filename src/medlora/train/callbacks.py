"""The callbacks every training run gets (SFT and preference): metrics.jsonl, medlora's checkpoint
state with best-K rotation, and the optional metric sinks (TensorBoard, W&B, MLflow).

They read the run's `RunState` (train/trainer.py) given at construction. Quality scoring during
training is its own callback: train/quality_callback.py.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from medlora.config import Recipe
from medlora.errors import TrainingError
from medlora.io import append_jsonl, read_jsonl, write_json_atomic, write_jsonl_atomic
from medlora.train.trainer import RunState

CHECKPOINT_STATE = "medlora_state.json"


class MetricsJsonl(TrainerCallback):
    """One JSON line per log event (the trainer adds tokens, time and memory to each)."""

    def __init__(self, metrics_path: Path) -> None:
        self.metrics_path = metrics_path
        self.last_seconds = 0.0
        self.last_tokens = 0

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        for key, value in logs.items():
            if isinstance(value, int | float) and math.isfinite(value):
                row[key] = value
            else:
                row[key] = str(value)
        if "loss" in logs and "train_seconds" in logs:  # tokens/s since the last training row
            seconds = logs["train_seconds"] - self.last_seconds
            tokens = logs["tokens_seen"] - self.last_tokens
            row["tokens_per_s"] = round(tokens / max(seconds, 1e-9), 2)
            self.last_seconds, self.last_tokens = logs["train_seconds"], logs["tokens_seen"]
        append_jsonl(self.metrics_path, row)


class Checkpoints(TrainerCallback):
    """Starts the training clock; saves medlora's counters beside each checkpoint and keeps the best
    `keep_best` checkpoints by eval_loss plus the latest."""

    def __init__(self, run: RunState, keep_best: int) -> None:
        self.run = run
        self.keep_best = keep_best

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.run.start_clock()  # model loading and Trainer set-up are not training

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        write_json_atomic(
            folder / CHECKPOINT_STATE,
            {
                "step": state.global_step,
                "tokens_seen": self.run.counter.tokens_seen,
                "answer_tokens_seen": self.run.counter.answer_tokens_seen,
                "train_seconds": self.run.train_seconds(),
            },
        )
        rotate_checkpoints(Path(args.output_dir), state.log_history, self.keep_best)


def rotate_checkpoints(folder: Path, log_history: list[dict[str, Any]], keep_best: int) -> None:
    """Delete checkpoints outside the best `keep_best` by eval_loss; the latest always stays."""
    found = sorted(
        (int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*") if p.is_dir()
    )
    if not found:
        return
    losses = {row["step"]: row["eval_loss"] for row in log_history if "eval_loss" in row}
    scored = sorted((losses[step], step) for step, _ in found if step in losses)
    keep = {step for _, step in scored[:keep_best]} | {found[-1][0]}
    for step, path in found:
        if step not in keep:
            shutil.rmtree(path, ignore_errors=True)


def last_checkpoint(run_dir: Path) -> Path | None:
    folders = [p for p in (run_dir / "checkpoints").glob("checkpoint-*") if p.is_dir()]
    # A checkpoint without medlora's state file was interrupted while being written.
    complete = [p for p in folders if (p / CHECKPOINT_STATE).is_file()]
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


def resume_from(checkpoint: Path | None, run: RunState, metrics_path: Path) -> None:
    """Put a checkpoint's counters back into `run` and drop the log rows the run will write again;
    without a checkpoint, a fresh run starts a fresh log."""
    if checkpoint is None:
        metrics_path.unlink(missing_ok=True)
        return
    state = json.loads((checkpoint / CHECKPOINT_STATE).read_text(encoding="utf-8"))
    run.counter.tokens_seen = state["tokens_seen"]
    run.counter.answer_tokens_seen = state["answer_tokens_seen"]
    run.previous_seconds = state["train_seconds"]
    if metrics_path.exists():
        kept = [row for row in read_jsonl(metrics_path) if row.get("step", 0) <= state["step"]]
        write_jsonl_atomic(metrics_path, kept)


# What tracking_callbacks set for an earlier run of this process (`medlora sweep` trains several):
# replaced by the next run's folder, while a value the user set before stays.
_RUN_ENV: dict[str, str] = {}


def _point_at_run(name: str, value: str) -> None:
    """Set WANDB_DIR / MLFLOW_TRACKING_URI to this run's folder unless the user chose one."""
    current = os.environ.get(name)
    if current is None or current == _RUN_ENV.get(name):
        os.environ[name] = _RUN_ENV[name] = value


# Each sink's package and how to install it: a missing one stops the run in one line.
SINK_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install 'medlora[track]' (or tensorboard)"),
    "wandb": ("wandb", "pip install 'medlora[track]'"),
    "mlflow": ("mlflow", "pip install mlflow"),
}


def tracking_callbacks(recipe: Recipe, run_dir: Path) -> list[Any]:
    """TensorBoard writes to RUN_DIR/tensorboard; W&B and MLflow come in through report_to."""
    sinks = recipe.output.report_to
    for sink, (package, install) in SINK_PACKAGES.items():
        if sink in sinks:
            try:
                importlib.import_module(package)
            except ImportError:
                raise TrainingError(
                    f"output.report_to has {sink} but the package is missing: {install}"
                ) from None
    callbacks: list[Any] = []
    if "tensorboard" in sinks:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(str(run_dir / "tensorboard"))))
    if "wandb" in sinks:
        # Offline runs (WANDB_MODE=offline) land in RUN_DIR/wandb, synced later with `wandb sync`.
        _point_at_run("WANDB_DIR", str(run_dir))
    if "mlflow" in sinks:
        _point_at_run("MLFLOW_TRACKING_URI", (run_dir / "mlruns").resolve().as_uri())
    return callbacks
