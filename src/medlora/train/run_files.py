"""The run directory's side of training, shared by SFT (train/loop.py) and preference tuning
(train/preference.py): splits in, the records to train on, adapter files and train_summary.json out,
and the one-line errors a stopped run gives. Only the main process writes (torchrun / accelerate).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlora.config import Recipe
from medlora.data.canaries import (
    CANARIES_FILE,
    Canary,
    insert_canaries,
    make_canaries,
    write_canaries,
    write_trained_ids,
)
from medlora.data.format import token_counter
from medlora.data.hygiene import drop_repetitive
from medlora.data.mix import training_records
from medlora.data.prepare import load_splits, prepare_data
from medlora.data.records import Record
from medlora.errors import TrainingError
from medlora.io import move_files_atomic
from medlora.train.callbacks import last_checkpoint
from medlora.train.trainer import NonFiniteLoss, RunState, peak_memory


def process_state() -> Any:
    """accelerate's view of this process under torchrun / accelerate launch (rank, barriers).
    `cpu=True` without CUDA: otherwise accelerate sees no distributed run on CPU (gloo DDP)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """True on the process that writes run files (rank 0; the only one when not distributed)."""
    return bool(process_state().is_main_process)


@dataclass
class TrainResult:
    run_dir: Path
    train_examples: int
    val_examples: int
    steps: int
    train_loss: float | None
    eval_loss: float | None
    runtime_s: float
    tokens_per_s: float
    trained_tokens: int
    train_seconds: float = 0.0
    peak_rss_mb: float | None = None
    peak_gpu_memory_mb: float | None = None
    # tokens_per_batch: auto — what was measured and chosen (medlora.train.memory.RowChoice)
    row_choice: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["run_dir"] = str(self.run_dir)
        return data


def load_or_prepare_splits(
    recipe: Recipe, data_dir: Path, tokenizer: Any, prepared_dir: Path | None = None
) -> tuple[dict[str, list[Record]], dict[str, Any]]:
    """Read splits written by `medlora data prepare`, or prepare them now into `data_dir`."""
    source_dir = prepared_dir or data_dir
    state = process_state()
    # Under torchrun the main process prepares the splits; the others wait, then read them.
    with state.main_process_first():
        if prepared_dir is None and state.is_main_process:
            _prepare(recipe, data_dir, tokenizer)
    card_path = source_dir / "data_card.json"
    card = json.loads(card_path.read_text(encoding="utf-8")) if card_path.is_file() else {}
    return load_splits(source_dir), card


def _prepare(recipe: Recipe, data_dir: Path, tokenizer: Any) -> None:
    prepare_data(
        recipe.data.sources,
        data_dir,
        column_map=recipe.data.map or None,
        exclude=recipe.data.exclude,
        strict=recipe.data.strict,
        val_fraction=recipe.data.val_fraction,
        test_fraction=recipe.data.test_fraction,
        count_tokens=token_counter(tokenizer, recipe.data.system_prompt),
        hygiene=recipe.data.clean,
    )


def sample_training_records(
    train_split: list[Record], recipe: Recipe
) -> tuple[list[Record], dict[str, Any], int]:
    """The records a run trains on: repetitive answers left out (`data.max_answer_repetition`),
    then mixed and sampled by `data.weights` / `data.max_train_examples` / `data.mix_by`.
    Returns (records, mix statistics, how many were left out as repetitive)."""
    d = recipe.data
    pool, repetitive = drop_repetitive(train_split, d.max_answer_repetition)
    records, mix_stats = training_records(pool, d.weights, d.max_train_examples, d.seed, d.mix_by)
    return records, mix_stats, repetitive


def insert_run_canaries(records: list[Record], recipe: Recipe) -> tuple[list[Record], list[Canary]]:
    """`data.canaries`: made-up secret records put among the sampled training records (after
    sampling, so `data.max_train_examples` counts the real data), and every canary made (the
    controls too). Without the option: `records` untouched and no canary."""
    options = recipe.data.canaries
    if options is None:
        return records, []
    canaries = make_canaries(options.repeats, options.digits, options.seed)
    return insert_canaries(records, canaries, options.seed), canaries


def canary_counts(canaries: list[Canary]) -> dict[str, int]:
    """What the data card says about the canaries: counts only, never a secret."""
    inserted = [c for c in canaries if c.repeats]
    return {
        "inserted": len(inserted),
        "controls": len(canaries) - len(inserted),
        "examples": sum(c.repeats for c in inserted),
    }


def write_audit_files(
    run_dir: Path, trained: list[Record], splits_dir: Path, canaries: list[Canary]
) -> None:
    """What `medlora audit` reads: the trained records' ids (trained_ids.json) and the canaries
    with their secrets (canaries.json, only when the recipe has data.canaries)."""
    write_trained_ids(run_dir, trained, splits_dir)
    if canaries:
        write_canaries(run_dir / CANARIES_FILE, canaries)


def check_writable(run_dir: Path) -> None:
    """Fail before any work when the run directory cannot take files (read-only, full, a file)."""
    if not is_main_process():
        return
    probe = run_dir / ".medlora-write-test"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise TrainingError(
            f"cannot write to the run directory {run_dir}: {error.strerror or error}; "
            "choose another --out (or free disk space)"
        ) from None


def save_run_files(trainer: Any, tokenizer: Any, run_dir: Path) -> None:
    """Adapter and tokenizer go to a scratch folder first, then move in file by file (atomic).

    Every process calls this: under FSDP/DeepSpeed the adapter is gathered from all of them, and
    only the main process writes.
    """
    scratch = run_dir / ".save.tmp"
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(scratch, ignore_errors=True)
    try:
        trainer.save_model(str(scratch))
        if not main:
            return
        tokenizer.save_pretrained(scratch)
        # Keep the template beside the adapter even where the tokenizer stores it in its config.
        if not (scratch / "chat_template.jinja").exists() and tokenizer.chat_template:
            (scratch / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
        # PEFT drops a blank model-card template; the real card comes from `medlora report`.
        (scratch / "README.md").unlink(missing_ok=True)
        (scratch / "training_args.bin").unlink(missing_ok=True)  # pickled; recipe.yaml says it all
    except OSError as error:
        shutil.rmtree(scratch, ignore_errors=True)
        raise TrainingError(
            f"could not save the adapter in {run_dir}: {error.strerror or error}; nothing was "
            "replaced (free disk space, then `medlora train ... --resume`)"
        ) from None
    move_files_atomic(scratch, run_dir)


def stopped_error(error: NonFiniteLoss, run_dir: Path, advice: str) -> TrainingError:
    good = last_checkpoint(run_dir)
    kept = f"last good checkpoint: {good}" if good else "no checkpoint was saved yet"
    return TrainingError(
        f"{error}; training stopped ({kept}). {advice}, then run again (with --resume to start "
        "from the checkpoint)"
    )


def unwritable_error(error: OSError, run_dir: Path) -> TrainingError:
    return TrainingError(
        f"could not write to {run_dir}: {error.strerror or error}; completed checkpoints are "
        "intact: free disk space and run again with --resume"
    )


def train_result(
    trainer: Any,
    run: RunState,
    run_dir: Path,
    train_examples: int,
    val_examples: int,
    output: Any,
    runtime: float,
) -> TrainResult:
    """What `train_summary.json` holds (SFT and preference runs alike)."""
    seconds = run.train_seconds()
    return TrainResult(
        run_dir=run_dir,
        train_examples=train_examples,
        val_examples=val_examples,
        steps=trainer.state.global_step,
        train_loss=output.training_loss,
        eval_loss=None,
        runtime_s=round(runtime, 2),
        train_seconds=round(seconds, 2),
        tokens_per_s=round(run.counter.tokens_seen / max(seconds, 1e-9), 2),
        trained_tokens=run.counter.answer_tokens_seen,
        **peak_memory(),
    )


def run_trainer(
    trainer: Any, checkpoint: Path | None, run_dir: Path, advice: str
) -> tuple[Any, float]:
    """`trainer.train()` (from `checkpoint` when resuming) → (its output, seconds). A NaN loss or a
    full disk ends in one line naming the last good checkpoint; `advice` says what to change."""
    import time

    start = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except NonFiniteLoss as error:
        raise stopped_error(error, run_dir, advice) from None
    except OSError as error:
        raise unwritable_error(error, run_dir) from None
    return output, time.perf_counter() - start
