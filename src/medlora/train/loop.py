"""LoRA fine-tuning on the HF `Trainer` (so `accelerate launch` / `torchrun` work unchanged).

train() = load model → prepare or read splits → format with answer-only labels → PEFT LoRA →
Trainer with a metrics callback → atomically saved adapter, tokenizer, recipe, metrics, charts.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlora.config import Recipe
from medlora.data.format import IGNORE_INDEX, Example, format_records, pad_batch, token_counter
from medlora.data.hygiene import drop_repetitive
from medlora.data.mix import source_group, training_records, used_by_group
from medlora.data.pack import collate_packed, pack_rows
from medlora.data.prepare import load_splits, prepare_data
from medlora.data.records import Record
from medlora.data.sample import sample_records
from medlora.errors import TrainingError
from medlora.io import append_jsonl, move_files_atomic, write_json_atomic, write_text_atomic
from medlora.models import load_recipe_model
from medlora.train.charts import plot_training_charts
from medlora.train.kernels.answer_head import answer_loss_sum
from medlora.train.kernels.packed_attention import use_packed_attention
from medlora.train.memory import (
    PeakSampler,
    RowChoice,
    choose_row_tokens,
    current_rss_bytes,
    peak_rss_bytes,
    release_free_memory,
)


class TokenCounter:
    """Tokens that went through training steps (counted at the step: the data loader reads ahead)."""

    def __init__(self) -> None:
        self.tokens_seen = 0
        self.answer_tokens_seen = 0

    def count(self, inputs: dict[str, Any]) -> None:
        mask = inputs.get("attention_mask")
        # Packed rows carry no attention mask and no padding: every id is a real token.
        self.tokens_seen += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        self.answer_tokens_seen += int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())


def peak_memory() -> dict[str, float]:
    """Peak memory so far: GPU allocations when on CUDA, else the process's peak resident set
    (across the high-water-mark resets of `tokens_per_batch: auto`'s probes)."""
    import torch

    if torch.cuda.is_available():
        return {"peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    return {"peak_rss_mb": round(peak_rss_bytes() / 2**20, 1)}


class TokenAndClockLogs:
    """Mixin for the Trainer subclasses (SFT and preference): every training log row carries the
    tokens trained, the training seconds (evaluation excluded) and peak memory."""

    token_counter: TokenCounter
    train_clock_start: float | None = None
    eval_seconds: float = 0.0

    def train_seconds(self) -> float:
        if self.train_clock_start is None:
            return 0.0
        return time.perf_counter() - self.train_clock_start - self.eval_seconds

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["tokens_seen"] = self.token_counter.tokens_seen
            logs["trained_tokens"] = self.token_counter.answer_tokens_seen
            logs["train_seconds"] = round(self.train_seconds(), 3)
            logs.update(peak_memory())
        super().log(logs, start_time)  # type: ignore[misc]


def _trainer_class() -> Any:
    import torch
    from transformers import Trainer

    class MedloraTrainer(TokenAndClockLogs, Trainer):
        """The HF Trainer with answer-only loss, token counting, NaN stop and exact evaluation."""

        token_counter: TokenCounter
        stop_on_nan: bool = True
        unlikelihood: float = 0.0
        shuffle: bool = True
        val_examples: list[Example] = []
        val_groups: list[str] = []  # the recipe source each validation example came from
        pad_token_id: int = 0
        eval_batch_size: int = 8

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            loss_sum, count, outputs = answer_loss_sum(
                model, inputs, unlikelihood=self.unlikelihood if model.training else 0.0
            )
            if num_items_in_batch is not None:
                # Token-weighted over the whole optimizer step (all micro-batches, all processes),
                # so packing, padding and accumulation never change the objective.
                loss = loss_sum / num_items_in_batch
                if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                    loss = loss * self.accelerator.num_processes  # DDP averages gradients
            else:
                loss = loss_sum / max(count, 1)
            if model.training:
                self.token_counter.count(inputs)
                if self.stop_on_nan and not torch.isfinite(loss.detach()):
                    raise NonFiniteLoss(self.state.global_step + 1, float(loss.detach()))
            return (loss, outputs) if return_outputs else loss

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            if not self.shuffle:
                # File order, for runs that must replay exactly (and the DDP equality test).
                return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)
            return super()._get_train_sampler(train_dataset)

        def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
            started = time.perf_counter()
            try:
                if self.args.world_size > 1 or not self.val_examples:
                    return super().evaluate(*args, **kwargs)
                return self._exact_evaluate()
            finally:
                self.eval_seconds += time.perf_counter() - started

        def _exact_evaluate(self) -> dict[str, float]:
            """Token-weighted answer loss over the whole validation set, and per data source.

            The same number `medlora eval` reports (Trainer's own loop averages batch means).
            """
            from medlora.evaluate.loss import score_examples

            was_training = self.model.training
            scored = score_examples(
                self.model, self.val_examples, self.pad_token_id, self.eval_batch_size
            )
            if was_training:
                self.model.train()
            metrics = {"eval_loss": scored["loss"], "eval_perplexity": scored["perplexity"]}
            groups: dict[str, list[int]] = {}
            for i, group in enumerate(self.val_groups):
                groups.setdefault(group, []).append(i)
            if len(groups) > 1:
                for name, indices in sorted(groups.items()):
                    weights = [self.val_examples[i].answer_tokens for i in indices]
                    total = sum(
                        scored["per_example_loss"][i] * w
                        for i, w in zip(indices, weights, strict=True)
                    )
                    metrics[f"eval_loss_{name}"] = total / max(sum(weights), 1)
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(
                self.args, self.state, self.control, metrics
            )
            return metrics

    return MedloraTrainer


class NonFiniteLoss(TrainingError):
    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"loss became {value} at step {step}")
        self.step = step


def _as_rows(examples: list[Example]) -> list[dict[str, Any]]:
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]


def _metrics_callback(metrics_path: Path) -> Any:
    from transformers import TrainerCallback

    class MetricsJsonl(TrainerCallback):
        """One JSON line per log event (the trainer adds tokens, time and memory to each)."""

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            if not state.is_world_process_zero or not logs:
                return
            row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
            for key, value in logs.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    row[key] = value
                else:
                    row[key] = str(value)
            if "loss" in logs and "train_seconds" in logs:
                seconds = self._seconds_since_last(logs["train_seconds"])
                tokens = self._tokens_since_last(logs["tokens_seen"])
                row["tokens_per_s"] = round(tokens / max(seconds, 1e-9), 2)
            append_jsonl(metrics_path, row)

        last_seconds = 0.0
        last_tokens = 0

        def _seconds_since_last(self, now: float) -> float:
            elapsed, self.last_seconds = now - self.last_seconds, now
            return elapsed

        def _tokens_since_last(self, now: int) -> int:
            count, self.last_tokens = now - self.last_tokens, now
            return count

    return MetricsJsonl()


CHECKPOINT_STATE = "medlora_state.json"


def _checkpoint_callback(trainer_ref: dict[str, Any], keep_best: int) -> Any:
    """Save medlora's counters beside each checkpoint; keep the best K by eval_loss + the latest."""
    from transformers import TrainerCallback

    class Checkpoints(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # Training time starts here: model loading and Trainer set-up are not training.
            trainer = trainer_ref["trainer"]
            trainer.train_clock_start = time.perf_counter() - trainer_ref.get("previous_seconds", 0)

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not state.is_world_process_zero:
                return
            trainer = trainer_ref["trainer"]
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_json_atomic(
                folder / CHECKPOINT_STATE,
                {
                    "step": state.global_step,
                    "tokens_seen": trainer.token_counter.tokens_seen,
                    "answer_tokens_seen": trainer.token_counter.answer_tokens_seen,
                    "train_seconds": trainer.train_seconds(),
                },
            )
            rotate_checkpoints(Path(args.output_dir), state.log_history, keep_best)

    return Checkpoints()


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


def _truncate_metrics(metrics_path: Path, step: int) -> None:
    """Drop log rows the resumed run will write again (logged after the checkpoint)."""
    if not metrics_path.exists():
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    write_text_atomic(
        metrics_path,
        "".join(json.dumps(row) + "\n" for row in rows if row.get("step", 0) <= step),
    )


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
    if prepared_dir is None:
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
    card_path = source_dir / "data_card.json"
    card = json.loads(card_path.read_text(encoding="utf-8")) if card_path.is_file() else {}
    return load_splits(source_dir), card


def _training_arguments(recipe: Recipe, run_dir: Path, has_eval: bool) -> Any:
    from transformers import TrainingArguments

    kwargs = training_kwargs(recipe, run_dir, has_eval)
    return TrainingArguments(**_supported_arguments(TrainingArguments, kwargs))


def training_kwargs(recipe: Recipe, run_dir: Path, has_eval: bool) -> dict[str, Any]:
    """`TrainingArguments` keywords from the recipe (also the base of TRL's preference configs)."""
    import torch

    t = recipe.train
    if t.precision == "fp16" and not torch.cuda.is_available():
        raise TrainingError(
            "train.precision=fp16 needs a CUDA GPU and none is visible; use --set train.precision=fp32 "
            "(or bf16) on this machine"
        )
    report_to = [sink for sink in recipe.output.report_to if sink not in ("jsonl", "tensorboard")]
    if t.packing:
        sampling = "random" if t.shuffle else "sequential"
    elif t.group_by_length:
        sampling = "group_by_length"
    else:
        sampling = "random" if t.shuffle else "sequential"
    save_steps = t.save_steps or 500
    kwargs = dict(
        output_dir=str(run_dir / "checkpoints"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        # A packed row already holds tokens_per_batch tokens: one row per micro-batch.
        per_device_train_batch_size=1 if t.packing else t.batch_size,
        per_device_eval_batch_size=max(recipe.eval.batch_size, 1),
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float below 1 is a ratio of all steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        neftune_noise_alpha=t.neftune_noise_alpha,
        optim=t.optimizer,
        fp16=t.precision == "fp16",
        bf16=t.precision == "bf16",
        # Without CUDA: CPU training, and `torchrun`/`accelerate launch` give multi-process gloo DDP.
        use_cpu=not torch.cuda.is_available(),
        logging_steps=t.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN must be seen (and stop the run), not averaged away
        eval_strategy="steps" if has_eval and t.eval_steps > 0 else "no",
        eval_steps=t.eval_steps or None,
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=save_steps,
        save_total_limit=None,  # medlora keeps the best K by validation loss (rotate_checkpoints)
        seed=t.seed,
        data_seed=t.seed,
        train_sampling_strategy=sampling,
        gradient_checkpointing=t.gradient_checkpointing,
        torch_compile=t.compile,
        report_to=report_to or "none",
        project="medlora",
        run_name=run_dir.name,
        remove_unused_columns=False,
        dataloader_num_workers=0,  # the token counters must live in this process
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=False,
    )
    return kwargs


def _supported_arguments(arguments_class: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop arguments an older transformers 5.x lacks (GPU images often lag PyPI by months)."""
    import dataclasses

    names = {field.name for field in dataclasses.fields(arguments_class)}
    if "train_sampling_strategy" not in names:
        # Older name; "sequential" is served by MedloraTrainer._get_train_sampler instead.
        kwargs["group_by_length"] = kwargs.pop("train_sampling_strategy") == "group_by_length"
    if "activation_checkpointing" in names:  # 5.2x renamed it; the old name warns
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
    return {key: value for key, value in kwargs.items() if key in names}


def _tracking_callbacks(recipe: Recipe, run_dir: Path) -> list[Any]:
    """TensorBoard writes to RUN_DIR/tensorboard; W&B and MLflow come in through report_to."""
    import os

    sinks = recipe.output.report_to
    callbacks: list[Any] = []
    if "tensorboard" in sinks:
        try:
            from torch.utils.tensorboard import SummaryWriter
            from transformers.integrations import TensorBoardCallback
        except ImportError:
            raise TrainingError(
                "output.report_to has tensorboard but the package is missing: "
                "pip install 'medlora[track]' (or tensorboard)"
            ) from None
        callbacks.append(TensorBoardCallback(SummaryWriter(str(run_dir / "tensorboard"))))
    if "wandb" in sinks:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise TrainingError(
                "output.report_to has wandb but the package is missing: pip install 'medlora[track]'"
            ) from None
        # Offline runs (WANDB_MODE=offline) land in RUN_DIR/wandb, synced later with `wandb sync`.
        os.environ.setdefault("WANDB_DIR", str(run_dir))
    if "mlflow" in sinks:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise TrainingError(
                "output.report_to has mlflow but the package is missing: pip install mlflow"
            ) from None
        os.environ.setdefault("MLFLOW_TRACKING_URI", (run_dir / "mlruns").resolve().as_uri())
    return callbacks


def _check_writable(run_dir: Path) -> None:
    """Fail before any work when the run directory cannot take files (read-only, full, a file)."""
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


def _save_run_files(trainer: Any, tokenizer: Any, run_dir: Path) -> None:
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


def _build_model(recipe: Recipe, model_and_tokenizer: tuple[Any, Any] | None) -> tuple[Any, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    model, tokenizer = model_and_tokenizer or load_recipe_model(recipe)
    if recipe.train.packing and not torch.cuda.is_available():
        # CPU: per-example causal SDPA beats sdpa's row-wide block mask. On GPUs the masked kernel
        # measured faster (many small per-example launches; docs/benchmarks.md `gpu`).
        use_packed_attention(model)
    lora = recipe.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_config)
    if not torch.cuda.is_available():
        from medlora.train.kernels.lora_dropout import use_fast_lora_dropout
        from medlora.train.kernels.rms_norm import use_fast_rms_norm

        use_fast_lora_dropout(model)  # CPU: torch's per-element Bernoulli draws are the slow part
        use_fast_rms_norm(model)  # CPU: a frozen-weight norm in 3 + 4 passes instead of ~18
    if recipe.train.gradient_checkpointing:
        model.enable_input_require_grads()
    return model, tokenizer


def fit_rows_to_budget(model: Any, examples: list[Example], recipe: Recipe) -> RowChoice:
    """`tokens_per_batch: auto`: probe forward + backward on the run's own packed rows and keep the
    longest row that fits `train.max_memory_gb` (medlora.train.memory). RNG state is restored, so the
    probe does not change the run."""
    import torch

    t, d = recipe.train, recipe.data
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    model.train()
    rng = torch.get_rng_state()

    def probe(tokens: int) -> int:
        rows = pack_rows(examples, tokens, t.seed)
        fullest = max(rows, key=lambda row: sum(len(p["input_ids"]) for p in row["parts"]))
        batch = {k: v.to(device) for k, v in collate_packed([fullest]).items()}
        autocast = torch.autocast(
            device, dtype=torch.bfloat16 if t.precision == "bf16" else torch.float16,
            enabled=t.precision != "fp32",
        )  # fmt: skip
        with PeakSampler(device) as peak:
            with autocast:
                loss, count, _ = answer_loss_sum(model, batch, unlikelihood=t.unlikelihood_alpha)
            (loss / max(count, 1)).backward()
        model.zero_grad(set_to_none=True)
        return peak.peak

    def checkpoint_activations() -> None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()

    def floor() -> int:  # memory in use between passes
        if device == "cuda":
            return int(torch.cuda.memory_allocated())
        release_free_memory()
        return current_rss_bytes()

    try:
        choice = choose_row_tokens(
            probe, float(t.max_memory_gb or 0), d.max_seq_len, floor=floor,
            enable_checkpointing=checkpoint_activations,
        )  # fmt: skip
    except ValueError as err:
        raise TrainingError(
            f"train.max_memory_gb={t.max_memory_gb}: {err}; raise the budget or lower "
            "data.max_seq_len"
        ) from None
    finally:
        torch.set_rng_state(rng)
    return choice


def train(
    recipe: Recipe,
    run_dir: str | Path,
    *,
    prepared_dir: str | Path | None = None,
    resume: bool = False,
    model_and_tokenizer: tuple[Any, Any] | None = None,
) -> TrainResult:
    """Fine-tune `recipe.model.name` with LoRA; everything lands in `run_dir` (see DESIGN.md)."""
    import torch
    from transformers import set_seed

    run_dir = Path(run_dir)
    if recipe.train.method != "sft":  # DPO / ORPO on the same LoRA adapter (medlora.train.preference)
        from medlora.train.preference import train_preference

        return train_preference(
            recipe,
            run_dir,
            prepared_dir=prepared_dir,
            resume=resume,
            model_and_tokenizer=model_and_tokenizer,
        )
    _check_writable(run_dir)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    set_seed(recipe.train.seed)

    model, tokenizer = _build_model(recipe, model_and_tokenizer)
    splits, card = load_or_prepare_splits(
        recipe, run_dir / "data", tokenizer, Path(prepared_dir) if prepared_dir else None
    )
    d = recipe.data
    train_pool, repetitive = drop_repetitive(splits["train"], d.max_answer_repetition)
    train_records, mix_stats = training_records(
        train_pool, d.weights, d.max_train_examples, d.seed, d.mix_by
    )
    val_records = sample_records(splits["validation"], d.max_val_examples, d.seed)
    train_examples, train_stats = format_records(
        tokenizer, train_records, d.system_prompt, d.max_seq_len, d.truncation
    )
    val_examples, val_stats = format_records(tokenizer, val_records, d.system_prompt, d.max_seq_len)
    if not train_examples or train_stats.answer_tokens == 0:
        raise TrainingError(
            f"no answer token would be trained ({len(train_records)} training records, "
            f"{train_stats.dropped_no_answer_tokens} left with no answer after truncation to "
            f"data.max_seq_len={d.max_seq_len}); raise data.max_seq_len or shorten the prompts"
        )
    t = recipe.train
    row_choice = None
    if t.tokens_per_batch == "auto":
        row_choice = fit_rows_to_budget(model, train_examples, recipe)
        print(
            f"tokens_per_batch auto: {row_choice.tokens_per_batch} tokens per row "
            f"(predicted peak {row_choice.predicted_peak_gb:.2f} of {t.max_memory_gb} GB"
            f"{', activation checkpointing on' if row_choice.gradient_checkpointing else ''})",
            flush=True,
        )
    tokens_per_batch = row_choice.tokens_per_batch if row_choice else t.tokens_per_batch
    train_rows = (
        pack_rows(train_examples, max(int(tokens_per_batch), d.max_seq_len), t.seed)
        if t.packing
        else _as_rows(train_examples)
    )
    card["format"] = {"train": train_stats.to_dict(), "validation": val_stats.to_dict()}
    card["used"] = {"train": len(train_examples), "validation": len(val_examples)}
    card["used"].update(used_by_group(train_records, train_examples, mix_stats, val_records))
    if d.max_answer_repetition is not None:
        card["used"]["repetitive_dropped"] = repetitive
    if t.packing:
        card["used"]["packed_rows"] = len(train_rows)
    write_json_atomic(run_dir / "data_card.json", card)
    write_text_atomic(run_dir / "recipe.yaml", recipe.to_yaml())

    counter = TokenCounter()
    metrics_path = run_dir / "metrics.jsonl"
    checkpoint = last_checkpoint(run_dir) if resume else None
    if checkpoint is None and metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log
    trainer_ref: dict[str, Any] = {}
    trainer = _trainer_class()(
        model=model,
        args=_training_arguments(recipe, run_dir, bool(val_examples)),
        train_dataset=train_rows,
        eval_dataset=_as_rows(val_examples) if val_examples else None,
        data_collator=collate_packed
        if t.packing
        else functools.partial(pad_batch, pad_token_id=tokenizer.pad_token_id),
        callbacks=[
            _metrics_callback(metrics_path),
            _checkpoint_callback(trainer_ref, t.keep_best),
            *_tracking_callbacks(recipe, run_dir),
        ],
    )
    trainer_ref["trainer"] = trainer
    trainer.token_counter = counter
    trainer.stop_on_nan = t.stop_on_nan
    trainer.unlikelihood = t.unlikelihood_alpha
    trainer.shuffle = t.shuffle
    trainer.val_examples = val_examples
    group_of = {record.id: source_group(record) for record in val_records}
    trainer.val_groups = [group_of[example.record_id] for example in val_examples]
    trainer.pad_token_id = tokenizer.pad_token_id
    trainer.eval_batch_size = recipe.eval.batch_size
    if t.max_memory_gb is not None and t.packing:
        # Validation batches hold at most a training row's tokens (forward only: less memory).
        rows_per_batch = max(1, int(tokens_per_batch) // d.max_seq_len)
        trainer.eval_batch_size = min(recipe.eval.batch_size, rows_per_batch)
    if recipe.eval.during_training_every or recipe.eval.best_metric:
        from medlora.train.callbacks import attach_quality_callback

        attach_quality_callback(trainer, recipe, run_dir, tokenizer, val_records)
    previous_seconds = 0.0
    if checkpoint is not None:
        state = json.loads((checkpoint / CHECKPOINT_STATE).read_text(encoding="utf-8"))
        counter.tokens_seen = state["tokens_seen"]
        counter.answer_tokens_seen = state["answer_tokens_seen"]
        previous_seconds = state["train_seconds"]
        _truncate_metrics(metrics_path, state["step"])
    trainer_ref["previous_seconds"] = previous_seconds
    start = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except NonFiniteLoss as error:
        good = last_checkpoint(run_dir)
        kept = f"last good checkpoint: {good}" if good else "no checkpoint was saved yet"
        raise TrainingError(
            f"{error}; training stopped ({kept}). Lower train.lr or raise train.warmup_ratio, "
            "then run again (with --resume to start from the checkpoint)"
        ) from None
    except OSError as error:
        raise TrainingError(
            f"could not write to {run_dir}: {error.strerror or error}; completed checkpoints are "
            "intact: free disk space and run again with --resume"
        ) from None
    runtime = time.perf_counter() - start
    eval_loss = trainer.evaluate()["eval_loss"] if val_examples else None
    _save_run_files(trainer, tokenizer, run_dir)
    if not trainer.is_world_process_zero():
        return _result(trainer, run_dir, train_examples, val_examples, output, eval_loss, runtime)
    plot_training_charts(metrics_path, run_dir / "charts")
    result = _result(trainer, run_dir, train_examples, val_examples, output, eval_loss, runtime)
    result.row_choice = row_choice.to_dict() if row_choice else None
    write_json_atomic(run_dir / "train_summary.json", result.to_dict())
    return result


def _result(
    trainer: Any,
    run_dir: Path,
    train_examples: list[Example],
    val_examples: list[Example],
    output: Any,
    eval_loss: float | None,
    runtime: float,
) -> TrainResult:
    counter = trainer.token_counter
    seconds = trainer.train_seconds()
    return TrainResult(
        run_dir=run_dir,
        train_examples=len(train_examples),
        val_examples=len(val_examples),
        steps=trainer.state.global_step,
        train_loss=output.training_loss,
        eval_loss=eval_loss,
        runtime_s=round(runtime, 2),
        train_seconds=round(seconds, 2),
        tokens_per_s=round(counter.tokens_seen / max(seconds, 1e-9), 2),
        trained_tokens=counter.answer_tokens_seen,
        **peak_memory(),
    )
