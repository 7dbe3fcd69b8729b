"""The run directory's side of training, shared by SFT (train/loop.py) and preference tuning
(train/preference.py): the recipe's data prepared (by the commands), the records to train on, the
run's files written before and after fitting, and the one-line errors a stopped run gives. Only the
main process writes (torchrun / accelerate).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
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
from medlora.data.prepare import prepare_data
from medlora.data.records import Record
from medlora.errors import TrainingError
from medlora.io import move_files_atomic, write_json_atomic, write_text_atomic
from medlora.results import TrainSummary, write_result
from medlora.train.callbacks import Checkpoints, MetricsJsonl, last_checkpoint, tracking_callbacks
from medlora.train.charts import plot_training_charts
from medlora.train.environment import environment
from medlora.train.trainer import NonFiniteLoss, RunState, peak_memory

DATA_CARD = "data_card.json"  # beside the splits; a run's own is RUN/data/data_card.json
METRICS = "metrics.jsonl"


def process_state() -> Any:
    """accelerate's view of this process under torchrun / accelerate launch (rank, barriers).
    `cpu=True` without CUDA: otherwise accelerate sees no distributed run on CPU (gloo DDP)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def prepare_run_data(recipe: Recipe, data_dir: Path, tokenizer: Any = None) -> Path:
    """The recipe's `data:` sources read, cleaned and split into `data_dir` (what `medlora data
    prepare` writes), for `medlora train` / `sweep` / `demo` without `--data`; token lengths with
    `tokenizer` (default: the recipe model's). Under torchrun the main process prepares; the others
    wait for it."""
    from medlora.models import load_tokenizer

    d, m = recipe.data, recipe.model
    check_writable(data_dir.parent)  # the run (or sweep) folder: one line before any work
    tokenizer = tokenizer or load_tokenizer(m.name, m.revision, m.trust_remote_code)
    state = process_state()
    with state.main_process_first():
        if state.is_main_process:
            prepare_data(
                d.sources,
                data_dir,
                column_map=d.map or None,
                exclude=d.exclude,
                strict=d.strict,
                val_fraction=d.val_fraction,
                test_fraction=d.test_fraction,
                count_tokens=token_counter(tokenizer, d.system_prompt),
                hygiene=d.clean,
            )
    return data_dir


def uses_splits(recipe: Recipe) -> bool:
    """Whether a run reads prepared splits: SFT, and preference pairs the model makes itself."""
    return recipe.train.method == "sft" or recipe.train.preference_data == "self"


@dataclass
class Fit:
    """One method's part of a run (SFT: loop.py, DPO/ORPO: preference.py), ready for `train`'s
    skeleton to write the run's files, train, and save."""

    trainer: Any
    run: RunState
    card: dict[str, Any]  # what the run used: merged into the data card
    train_examples: int
    val_examples: int
    advice: str  # what to change when the loss stops being finite
    trained: list[Record] = field(default_factory=list)  # the real records (trained_ids.json)
    canaries: list[Canary] = field(default_factory=list)
    row_choice: dict[str, Any] | None = None  # tokens_per_batch: auto, what was measured


def run_callbacks(recipe: Recipe, run_dir: Path, run: RunState) -> list[Any]:
    """metrics.jsonl, the best-K checkpoints and the recipe's trackers (every method)."""
    return [
        MetricsJsonl(run_dir / METRICS),
        Checkpoints(run, recipe.train.keep_best),
        *tracking_callbacks(recipe, run_dir),
    ]


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


def check_writable(run_dir: Path) -> None:
    """Fail before any work when the run directory cannot take files (read-only, full, a file)."""
    if not process_state().is_main_process:
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
        good = last_checkpoint(run_dir)
        kept = f"last good checkpoint: {good}" if good else "no checkpoint was saved yet"
        raise TrainingError(
            f"{error}; training stopped ({kept}). {advice}, then run again (with --resume to start "
            "from the checkpoint)"
        ) from None
    except OSError as error:
        raise TrainingError(
            f"could not write to {run_dir}: {error.strerror or error}; completed checkpoints are "
            "intact: free disk space and run again with --resume"
        ) from None
    return output, time.perf_counter() - start


def write_run_start(run_dir: Path, recipe: Recipe, model: Any, data_dir: Path, fit: Fit) -> None:
    """Before fitting: env.json, the run's one data card (RUN/data/data_card.json: the prepared
    card plus what this run used; a shared `--data` folder is left as it is), trained_ids.json /
    canaries.json for `medlora audit`, and the resolved recipe.yaml."""
    facts = environment(recipe, model)
    prepared_card = data_dir / DATA_CARD  # what `prepare_data` wrote beside the splits
    card = json.loads(prepared_card.read_text(encoding="utf-8")) if prepared_card.is_file() else {}
    card.update(fit.card)
    card["attention"] = facts.run.attention if facts.run else None
    if not process_state().is_main_process:
        return
    write_json_atomic(run_dir / "env.json", facts.model_dump())
    write_json_atomic(run_dir / "data" / DATA_CARD, card)
    (run_dir / DATA_CARD).unlink(missing_ok=True)  # where an older version kept the run's card
    if fit.trained:  # what `medlora audit` reads
        write_trained_ids(run_dir, fit.trained, data_dir)
        if fit.canaries:
            write_canaries(run_dir / CANARIES_FILE, fit.canaries)
    write_text_atomic(run_dir / "recipe.yaml", recipe.to_yaml())


def finish_run(
    fit: Fit, run_dir: Path, tokenizer: Any, output: Any, runtime: float
) -> TrainSummary:
    """After fitting: the final validation loss, the adapter and tokenizer saved, the charts and
    train_summary.json."""
    trainer = fit.trainer
    eval_loss = trainer.evaluate()["eval_loss"] if fit.val_examples else None
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(unwrapped, "peft_config", {}):
        unwrapped.delete_adapter("ref")  # DPO's frozen reference copy: not part of the result
    save_run_files(trainer, tokenizer, run_dir)
    seconds = fit.run.train_seconds()
    memory = peak_memory()
    summary = TrainSummary(
        run_dir=str(run_dir),
        train_examples=fit.train_examples,
        val_examples=fit.val_examples,
        steps=trainer.state.global_step,
        train_loss=output.training_loss,
        eval_loss=eval_loss,
        runtime_s=round(runtime, 2),
        tokens_per_s=round(fit.run.counter.tokens_seen / max(seconds, 1e-9), 2),
        trained_tokens=fit.run.counter.answer_tokens_seen,
        train_seconds=round(seconds, 2),
        peak_rss_mb=memory.get("peak_rss_mb"),
        peak_gpu_memory_mb=memory.get("peak_gpu_memory_mb"),
        row_choice=fit.row_choice,
    )
    if trainer.is_world_process_zero():
        plot_training_charts(run_dir / METRICS, run_dir / "charts")
        write_result(run_dir / "train_summary.json", summary)
    return summary
