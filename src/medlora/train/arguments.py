"""The recipe as library configs: `train:` as transformers `TrainingArguments` (and the base of TRL's
preference configs), `lora:` as peft's `LoraConfig`. Arguments the installed transformers/TRL lacks
are dropped with one warning."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from medlora.config import Recipe
from medlora.errors import TrainingError

logger = logging.getLogger(__name__)


def resolve_precision(recipe: Recipe) -> Recipe:
    """The recipe with `train.precision: auto` replaced by what this machine runs best: bf16 where
    matmuls run natively in bf16 (a CUDA GPU that supports it, an AMX / AVX512-BF16 CPU), else
    fp16 on a GPU and fp32 on a CPU. The run's recipe.yaml records the resolved value."""
    if recipe.train.precision != "auto":
        return recipe
    if torch.cuda.is_available():
        chosen = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        from medlora.machine import cpu_has_native_bf16

        chosen = "bf16" if cpu_has_native_bf16() else "fp32"
    logger.info("train.precision auto: %s on this machine", chosen)
    train = recipe.train.model_copy(update={"precision": chosen})
    return recipe.model_copy(update={"train": train})


def hold_frozen_weights_in_bf16(model: Any, recipe: Recipe) -> Any:
    """CPU bf16 training: keep the frozen float32 base in bf16 (the LoRA weights stay float32:
    peft's `autocast_adapter_dtype`). Under autocast alone every step re-casts all frozen weights
    (faster and smaller with bf16 weights: docs/benchmarks.md "CPU bf16: frozen base weights held in bf16")."""
    if recipe.train.precision != "bf16" or torch.cuda.is_available():
        return model
    if recipe.model.quantization != "none" or model.dtype != torch.float32:
        return model
    return model.to(torch.bfloat16)


def training_kwargs(recipe: Recipe, run_dir: Path, has_eval: bool) -> dict[str, Any]:
    """`TrainingArguments` keywords from the recipe."""
    t = recipe.train
    if t.precision == "auto":
        raise TrainingError("train.precision=auto must be resolved first (resolve_precision)")
    if t.precision == "fp16" and not torch.cuda.is_available():
        raise TrainingError(
            "train.precision=fp16 needs a CUDA GPU and none is visible; use --set train.precision=fp32 "
            "(or bf16) on this machine"
        )
    report_to = [sink for sink in recipe.output.report_to if sink not in ("jsonl", "tensorboard")]
    return dict(
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
        save_steps=t.save_steps or 500,
        save_total_limit=None,  # medlora keeps the best K by validation loss (rotate_checkpoints)
        seed=t.seed,
        data_seed=t.seed,
        # "sequential" keeps file order, for runs that must replay exactly (and the DDP test).
        train_sampling_strategy="random" if t.shuffle else "sequential",
        gradient_checkpointing=t.gradient_checkpointing,
        report_to=report_to or "none",
        project="medlora",
        run_name=run_dir.name,
        remove_unused_columns=False,
        dataloader_num_workers=0,  # the token counters must live in this process
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=False,
    )


def supported_arguments(arguments_class: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keywords `arguments_class` accepts; any other is dropped with one warning line naming
    them (GPU images often lag PyPI by months: the run goes on without, the user is told)."""
    names = {field.name for field in dataclasses.fields(arguments_class)}
    if "activation_checkpointing" in names and "gradient_checkpointing" in kwargs:
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")  # 5.2x rename
    dropped = sorted(key for key in kwargs if key not in names)
    if dropped:
        logger.warning(
            "%s of this transformers/trl install does not know %s: running without; "
            "upgrade transformers (tested with 5.24) to use them",
            arguments_class.__name__,
            ", ".join(dropped),
        )
    return {key: value for key, value in kwargs.items() if key in names}


def training_arguments(
    recipe: Recipe, run_dir: Path, has_eval: bool, arguments_class: Any = None, **extra: Any
) -> Any:
    """`TrainingArguments`, or `arguments_class` (TRL's DPOConfig / ORPOConfig) with `extra`."""
    from transformers import TrainingArguments

    arguments_class = arguments_class or TrainingArguments
    kwargs = {**training_kwargs(recipe, run_dir, has_eval), **extra}
    return arguments_class(**supported_arguments(arguments_class, kwargs))


def lora_config(recipe: Recipe) -> Any:
    """The recipe's `lora:` section as peft's `LoraConfig` (SFT and preference runs)."""
    from peft import EvaConfig, LoraConfig

    lora = recipe.lora
    eva = lora.init == "eva"
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        task_type="CAUSAL_LM",
        init_lora_weights="eva" if eva else True,
        eva_config=EvaConfig(rho=lora.eva_rho) if eva else None,
    )
