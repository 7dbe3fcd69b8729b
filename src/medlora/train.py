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
from medlora.data.format import Example, format_records, pad_batch, token_counter
from medlora.data.mix import mix_records, used_by_group
from medlora.data.prepare import load_splits, prepare_data
from medlora.data.records import Record
from medlora.data.sample import sample_records
from medlora.errors import TrainingError
from medlora.io import append_jsonl, move_files_atomic, write_json_atomic, write_text_atomic
from medlora.models import load_model
from medlora.report.charts import plot_training_charts


class TokenCounter:
    """Tokens that went through training steps (counted at the step: the data loader reads ahead)."""

    def __init__(self) -> None:
        self.tokens_seen = 0
        self.answer_tokens_seen = 0

    def count(self, inputs: dict[str, Any]) -> None:
        self.tokens_seen += int(inputs["attention_mask"].sum())
        self.answer_tokens_seen += int((inputs["labels"] != -100).sum())


def _trainer_class() -> Any:
    from transformers import Trainer

    class MedloraTrainer(Trainer):
        """The HF Trainer, plus token counting on every training micro-batch."""

        token_counter: TokenCounter

        def compute_loss(
            self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any
        ) -> Any:
            if model.training:
                self.token_counter.count(inputs)
            return super().compute_loss(model, inputs, *args, **kwargs)

    return MedloraTrainer


def _as_rows(examples: list[Example]) -> list[dict[str, Any]]:
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]


def _metrics_callback(metrics_path: Path, collator: TokenCounter) -> Any:
    from transformers import TrainerCallback

    class MetricsJsonl(TrainerCallback):
        """One JSON line per log event: step, epoch, loss, lr, grad norm, tokens/s, trained tokens."""

        def __init__(self) -> None:
            self.last_time = time.perf_counter()
            self.last_tokens = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.last_time = time.perf_counter()
            self.last_tokens = collator.tokens_seen

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
            if "loss" in logs:
                now = time.perf_counter()
                elapsed = max(now - self.last_time, 1e-9)
                row["tokens_per_s"] = round((collator.tokens_seen - self.last_tokens) / elapsed, 2)
                row["tokens_seen"] = collator.tokens_seen
                row["trained_tokens"] = collator.answer_tokens_seen
                self.last_time, self.last_tokens = now, collator.tokens_seen
            append_jsonl(metrics_path, row)

    return MetricsJsonl()


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
        )
    card_path = source_dir / "data_card.json"
    card = json.loads(card_path.read_text(encoding="utf-8")) if card_path.is_file() else {}
    return load_splits(source_dir), card


def _training_arguments(recipe: Recipe, run_dir: Path, has_eval: bool) -> Any:
    import torch
    from transformers import TrainingArguments

    t = recipe.train
    if t.precision == "fp16" and not torch.cuda.is_available():
        raise TrainingError(
            "train.precision=fp16 needs a CUDA GPU and none is visible; use --set train.precision=fp32 "
            "(or bf16) on this machine"
        )
    report_to = [sink for sink in recipe.output.report_to if sink != "jsonl"]
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=max(recipe.eval.batch_size, 1),
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float below 1 is a ratio of all steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        fp16=t.precision == "fp16",
        bf16=t.precision == "bf16",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval and t.eval_steps > 0 else "no",
        eval_steps=t.eval_steps or None,
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=t.save_steps or 500,
        seed=t.seed,
        data_seed=t.seed,
        gradient_checkpointing=t.gradient_checkpointing,
        report_to=report_to or "none",
        remove_unused_columns=False,
        dataloader_num_workers=0,  # the collator's token counters must live in this process
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=False,
    )


def _save_run_files(model: Any, tokenizer: Any, run_dir: Path) -> None:
    """Adapter and tokenizer go to a scratch folder first, then move in file by file (atomic)."""
    scratch = run_dir / ".save.tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    # Keep the template beside the adapter even where the tokenizer stores it in its config.
    if not (scratch / "chat_template.jinja").exists() and tokenizer.chat_template:
        (scratch / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
    move_files_atomic(scratch, run_dir)


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
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    set_seed(recipe.train.seed)

    model, tokenizer = model_and_tokenizer or load_model(
        recipe.model.name, recipe.model.dtype, recipe.model.revision, recipe.model.trust_remote_code
    )
    splits, card = load_or_prepare_splits(
        recipe, run_dir / "data", tokenizer, Path(prepared_dir) if prepared_dir else None
    )
    mix_stats = None
    if recipe.data.weights:  # mixing: each source group gets its weight's share of examples
        train_records, mix_stats = mix_records(
            splits["train"], recipe.data.weights, recipe.data.max_train_examples, recipe.data.seed
        )
    else:
        train_records = sample_records(
            splits["train"], recipe.data.max_train_examples, recipe.data.seed
        )
    val_records = sample_records(
        splits["validation"], recipe.data.max_val_examples, recipe.data.seed
    )
    d = recipe.data
    train_examples, train_stats = format_records(
        tokenizer, train_records, d.system_prompt, d.max_seq_len
    )
    val_examples, val_stats = format_records(tokenizer, val_records, d.system_prompt, d.max_seq_len)
    if not train_examples or train_stats.answer_tokens == 0:
        raise TrainingError(
            f"no answer token would be trained ({len(train_records)} training records, "
            f"{train_stats.dropped_no_answer_tokens} left with no answer after truncation to "
            f"data.max_seq_len={d.max_seq_len}); raise data.max_seq_len or shorten the prompts"
        )
    card["format"] = {"train": train_stats.to_dict(), "validation": val_stats.to_dict()}
    card["used"] = {"train": len(train_examples), "validation": len(val_examples)}
    card["used"].update(used_by_group(train_records, train_examples, mix_stats, val_records))
    write_json_atomic(run_dir / "data_card.json", card)
    write_text_atomic(run_dir / "recipe.yaml", recipe.to_yaml())

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
    if recipe.train.gradient_checkpointing:
        model.enable_input_require_grads()

    counter = TokenCounter()
    metrics_path = run_dir / "metrics.jsonl"
    checkpoints = run_dir / "checkpoints"
    resume_from = resume and checkpoints.is_dir() and any(checkpoints.glob("checkpoint-*"))
    if not resume_from and metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log
    trainer = _trainer_class()(
        model=model,
        args=_training_arguments(recipe, run_dir, bool(val_examples)),
        train_dataset=_as_rows(train_examples),
        eval_dataset=_as_rows(val_examples) if val_examples else None,
        data_collator=functools.partial(pad_batch, pad_token_id=tokenizer.pad_token_id),
        callbacks=[_metrics_callback(metrics_path, counter)],
    )
    trainer.token_counter = counter
    if recipe.eval.during_training_every or recipe.eval.best_metric:
        from medlora.evaluate.callback import attach_quality_callback

        attach_quality_callback(trainer, recipe, run_dir, tokenizer, val_records)
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=True if resume_from else None)
    runtime = time.perf_counter() - start
    eval_loss = None
    if val_examples:
        eval_loss = trainer.evaluate()["eval_loss"]
    _save_run_files(trainer.model, tokenizer, run_dir)
    plot_training_charts(metrics_path, run_dir / "charts")
    result = TrainResult(
        run_dir=run_dir,
        train_examples=len(train_examples),
        val_examples=len(val_examples),
        steps=trainer.state.global_step,
        train_loss=output.training_loss,
        eval_loss=eval_loss,
        runtime_s=round(runtime, 2),
        tokens_per_s=round(counter.tokens_seen / max(runtime, 1e-9), 2),
        trained_tokens=counter.answer_tokens_seen,
    )
    write_json_atomic(run_dir / "train_summary.json", result.to_dict())
    return result
