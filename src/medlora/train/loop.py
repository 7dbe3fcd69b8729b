"""LoRA fine-tuning on the HF `Trainer` (so `accelerate launch` / `torchrun` work unchanged).

`train()` below is the one run skeleton for every method: model + LoRA (`build_model`) → batches and
trainer (`sft_fit` here; DPO / ORPO: `preference_fit` in train/preference.py) → the run's files
(train/run_files.py) → fit → adapter, tokenizer, metrics, charts and train_summary.json saved
atomically into the run directory. The splits come prepared (`medlora train` / `sweep` / `demo`
prepare them, train/run_files.py `prepare_run_data`). Under DDP/FSDP every process trains; only the
main one writes files.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from medlora.config import Recipe
from medlora.data.format import Example, format_records, pad_batch
from medlora.data.mix import source_group, used_by_group
from medlora.data.pack import collate_packed, pack_rows, row_width_multiple
from medlora.data.prepare import load_splits
from medlora.data.records import Record
from medlora.data.sample import sample_records
from medlora.errors import ConfigError, TrainingError
from medlora.families import family_of
from medlora.models import load_recipe_model
from medlora.results import TrainSummary
from medlora.train.arguments import (
    hold_frozen_weights_in_bf16,
    lora_config,
    resolve_precision,
    training_arguments,
)
from medlora.train.callbacks import last_checkpoint, resume_from
from medlora.train.kernels import run_kernels, use_kernels_after_lora, use_kernels_before_lora
from medlora.train.kernels.answer_head import answer_loss_sum, output_head
from medlora.train.kernels.liger import check_liger
from medlora.train.memory import (
    PeakSampler,
    RowChoice,
    choose_row_tokens,
    current_rss_bytes,
    release_free_memory,
)
from medlora.train.preference import check_preference_recipe, preference_fit
from medlora.train.run_files import (
    METRICS,
    Fit,
    canary_counts,
    check_writable,
    finish_run,
    insert_run_canaries,
    run_callbacks,
    run_trainer,
    sample_training_records,
    uses_splits,
    write_run_start,
)
from medlora.train.trainer import MedloraTrainer, RunState


def _as_rows(examples: list[Example]) -> list[dict[str, Any]]:
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]


def build_model(recipe: Recipe, model_and_tokenizer: tuple[Any, Any] | None) -> tuple[Any, Any]:
    """The base (loaded, or the one given) with the run's kernels and a fresh LoRA adapter, or the
    adapter of an earlier run (`train.init_adapter`, DPO / ORPO after SFT)."""
    import torch
    from peft import PeftModel, get_peft_model

    t = recipe.train
    if t.kernels == "liger":  # before loading: a CPU run stops with one line
        check_liger("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = model_and_tokenizer or load_recipe_model(recipe)
    family_of(model.config)  # a family the matrix has not proven stops here, in one line
    model = hold_frozen_weights_in_bf16(model, recipe)
    plan = run_kernels(recipe, model)
    applied = use_kernels_before_lora(model, plan)
    if t.init_adapter is not None:
        folder = str(Path(t.init_adapter).expanduser())
        model = PeftModel.from_pretrained(model, folder, is_trainable=True)
    else:
        model = get_peft_model(model, lora_config(recipe))
    applied += use_kernels_after_lora(model, plan)
    # TRL computes the loss itself: no fused head for preference tuning.
    if t.method == "sft" and "fused_answer_head" in plan and output_head(model) is not None:
        applied.append("fused_answer_head")
    model.medlora_kernels = applied  # for the run's env.json
    if t.gradient_checkpointing:
        model.enable_input_require_grads()
    return model, tokenizer


def initialize_eva(model: Any, rows: list[dict[str, Any]], collate: Any) -> None:
    """EVA (Paischer et al. 2024, PEFT's `initialize_lora_eva_weights`): each LoRA A becomes the top
    right-singular vectors of its layer's inputs on the training answers (label-masked tokens),
    taken batch by batch until they settle. B stays 0, so training starts from the base model."""
    import torch
    from peft import initialize_lora_eva_weights
    from torch.utils.data import DataLoader

    model.to("cuda" if torch.cuda.is_available() else "cpu")  # PEFT moves each batch to it
    batches = DataLoader(rows, batch_size=1, collate_fn=collate)  # PEFT cycles it until settled
    with torch.no_grad():
        initialize_lora_eva_weights(model, batches, show_progress_bar=True)


def packed_collator(recipe: Recipe, tokens_per_batch: int) -> Any:
    """`collate_packed`, with row widths padded to a few sizes for CPU bf16 (row_width_multiple)."""
    import torch

    if recipe.train.precision == "bf16" and not torch.cuda.is_available():
        multiple = row_width_multiple(tokens_per_batch)
        return functools.partial(collate_packed, pad_to_multiple=multiple)
    return collate_packed


def training_batches(
    recipe: Recipe, tokenizer: Any, examples: list[Example], row_tokens: int
) -> tuple[list[dict[str, Any]], Any]:
    """(rows, collator): examples packed into rows of `row_tokens` (`train.packing`), else one
    example a row, padded per batch."""
    if recipe.train.packing:
        rows = pack_rows(examples, row_tokens, recipe.train.seed)
        return rows, packed_collator(recipe, row_tokens)
    collator = functools.partial(pad_batch, pad_token_id=tokenizer.pad_token_id)
    return _as_rows(examples), collator


def fit_rows_to_budget(model: Any, examples: list[Example], recipe: Recipe) -> RowChoice | None:
    """`tokens_per_batch: auto`: probe forward + backward on the run's own packed rows and keep the
    longest row that fits `train.max_memory_gb` (medlora.train.memory). RNG state is restored, so the
    probe does not change the run. None for a fixed `tokens_per_batch`."""
    import torch

    t, d = recipe.train, recipe.data
    if t.tokens_per_batch != "auto":
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    model.train()
    rng = torch.get_rng_state()

    def probe(tokens: int) -> int:
        row_tokens = max(tokens, d.max_seq_len)  # shorter: the front of one max_seq_len row
        rows = pack_rows(examples, row_tokens, t.seed)
        fullest = max(rows, key=lambda row: sum(len(p["input_ids"]) for p in row["parts"]))
        collate = packed_collator(recipe, row_tokens)
        batch = {k: v[:, :tokens].to(device) for k, v in collate([fullest]).items()}
        autocast = torch.autocast(
            device, dtype=torch.bfloat16 if t.precision == "bf16" else torch.float16,
            enabled=t.precision != "fp32",
        )  # fmt: skip
        with PeakSampler(device) as peak:
            with autocast:
                loss, count, _ = answer_loss_sum(
                    model, batch, unlikelihood=t.unlikelihood_alpha, kernels=t.kernels
                )
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
    print(
        f"tokens_per_batch auto: {choice.tokens_per_batch} tokens per row "
        f"(predicted peak {choice.predicted_peak_gb:.2f} of {t.max_memory_gb} GB"
        f"{', activation checkpointing on' if choice.gradient_checkpointing else ''})",
        flush=True,
    )
    return choice


def train(recipe: Recipe, run_dir: str | Path, **options: Any) -> TrainSummary:
    """`train_model` for its summary alone (what train_summary.json holds)."""
    return train_model(recipe, run_dir, **options)[0]


def train_model(
    recipe: Recipe,
    run_dir: str | Path,
    *,
    prepared_dir: str | Path | None = None,
    splits: dict[str, list[Record]] | None = None,
    resume: bool = False,
    model_and_tokenizer: tuple[Any, Any] | None = None,
) -> tuple[TrainSummary, Any]:
    """Fine-tune `recipe.model.name` with LoRA (`train.method`: sft, dpo or orpo); everything lands
    in `run_dir` (see DESIGN.md). The splits are read from `prepared_dir` (default RUN/data, where
    `medlora train` prepares them), or handed in as `splits` (read from `prepared_dir` already).
    Returns the run's summary and the trained PEFT model (in training form: kernels, precision)."""
    import torch
    from transformers import set_seed

    recipe = resolve_precision(recipe)
    if recipe.train.method == "sft":
        check_sft_recipe(recipe)
    else:  # fail in one line before any model is loaded
        recipe = check_preference_recipe(recipe)
    run_dir = Path(run_dir)
    data_dir = Path(prepared_dir) if prepared_dir else run_dir / "data"
    check_writable(run_dir)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    set_seed(recipe.train.seed)

    model, tokenizer = build_model(recipe, model_and_tokenizer)
    if splits is None and uses_splits(recipe):
        splits = load_splits(data_dir)
    checkpoint = last_checkpoint(run_dir) if resume else None
    method_fit = sft_fit if recipe.train.method == "sft" else preference_fit
    fit = method_fit(recipe, run_dir, model, tokenizer, splits or {}, checkpoint)
    write_run_start(run_dir, recipe, model, data_dir, fit)
    resume_from(checkpoint, fit.run, run_dir / METRICS)
    output, runtime = run_trainer(fit.trainer, checkpoint, run_dir, fit.advice)
    summary = finish_run(fit, run_dir, tokenizer, output, runtime)
    return summary, fit.trainer.accelerator.unwrap_model(fit.trainer.model)


def check_sft_recipe(recipe: Recipe) -> None:
    if recipe.data.end_of_turn_loss == 0 and recipe.train.unlikelihood_alpha > 0:
        # Unlikelihood pushes down every token already in the context, the prompt's end-of-turn
        # tokens included: with the end of turn never a target the demo model learned never to
        # stop (docs/benchmarks.md "answer-length").
        raise ConfigError(
            "data.end_of_turn_loss=0 (false) with train.unlikelihood_alpha > 0: the model learns never "
            "to stop (unlikelihood pushes the end of turn down); set train.unlikelihood_alpha=0 or "
            "data.end_of_turn_loss above 0"
        )


def sft_run_state(
    recipe: Recipe,
    tokenizer: Any,
    val_records: list[Record],
    val_examples: list[Example],
    row_tokens: int,
) -> RunState:
    """What MedloraTrainer and the callbacks share: the loss settings, the validation examples
    with their data source, and the memory measures under `train.max_memory_gb`."""
    import torch

    d, t = recipe.data, recipe.train
    group_of = {record.id: source_group(record) for record in val_records}
    run = RunState(
        stop_on_nan=t.stop_on_nan, unlikelihood=t.unlikelihood_alpha, kernels=t.kernels,
        loraplus_lr_ratio=t.loraplus_lr_ratio, val_examples=val_examples,
        val_groups=[group_of[example.record_id] for example in val_examples],
        pad_token_id=tokenizer.pad_token_id, eval_batch_size=recipe.eval.batch_size,
    )  # fmt: skip
    run.trim_between_steps = t.max_memory_gb is not None and not torch.cuda.is_available()
    if t.max_memory_gb is not None and t.packing:
        # Validation batches hold at most a training row's tokens (forward only: less memory).
        run.eval_batch_size = min(recipe.eval.batch_size, max(1, row_tokens // d.max_seq_len))
    return run


def sft_fit(
    recipe: Recipe,
    run_dir: Path,
    model: Any,
    tokenizer: Any,
    splits: dict[str, list[Record]],
    checkpoint: Path | None,
) -> Fit:
    """SFT: the sampled records as answer-only token ids (packed rows), the validation examples
    scored exactly, and `MedloraTrainer` (train/trainer.py) with its callbacks."""
    d, t = recipe.data, recipe.train
    records, mix_stats, repetitive = sample_training_records(splits["train"], recipe)
    train_records, canaries = insert_run_canaries(records, recipe)
    val_records = sample_records(splits["validation"], d.max_val_examples, d.seed)
    train_examples, train_stats = format_records(
        tokenizer, train_records, d.system_prompt, d.max_seq_len, d.truncation,
        d.end_of_turn_loss, d.seed,
    )  # fmt: skip
    val_examples, val_stats = format_records(tokenizer, val_records, d.system_prompt, d.max_seq_len)
    if not train_examples or train_stats.answer_tokens == 0:
        raise TrainingError(
            f"no answer token would be trained ({len(train_records)} training records, "
            f"{train_stats.dropped_no_answer_tokens} left with no answer after truncation to "
            f"data.max_seq_len={d.max_seq_len}); raise data.max_seq_len or shorten the prompts"
        )
    row_choice = fit_rows_to_budget(model, train_examples, recipe)
    row_tokens = max(
        int(row_choice.tokens_per_batch if row_choice else t.tokens_per_batch), d.max_seq_len
    )
    rows, collator = training_batches(recipe, tokenizer, train_examples, row_tokens)
    if recipe.lora.init == "eva" and checkpoint is None:  # a resumed run loads its trained A, B
        initialize_eva(model, rows, collator)
    used = {"train": len(train_examples), "validation": len(val_examples)}
    used.update(used_by_group(train_records, train_examples, mix_stats, val_records))
    if d.max_answer_repetition is not None:
        used["repetitive_dropped"] = repetitive
    if t.packing:
        used["packed_rows"] = len(rows)
    if canaries:
        used["canaries"] = canary_counts(canaries)

    run = sft_run_state(recipe, tokenizer, val_records, val_examples, row_tokens)
    trainer = MedloraTrainer(
        model=model,
        args=training_arguments(recipe, run_dir, bool(val_examples)),
        train_dataset=rows,
        eval_dataset=_as_rows(val_examples) if val_examples else None,
        data_collator=collator,
        callbacks=run_callbacks(recipe, run_dir, run),
        run=run,
    )
    if recipe.eval.during_training_every or recipe.eval.best_metric:
        from medlora.train.quality_callback import attach_quality_callback

        attach_quality_callback(trainer, recipe, run_dir, tokenizer, val_records)
    formatted = {"train": train_stats.to_dict(), "validation": val_stats.to_dict()}
    return Fit(
        trainer,
        run,
        {"format": formatted, "used": used},
        len(train_examples),
        len(val_examples),
        advice="Lower train.lr or raise train.warmup_ratio",
        trained=records,
        canaries=canaries,
        row_choice=row_choice.to_dict() if row_choice else None,
    )
