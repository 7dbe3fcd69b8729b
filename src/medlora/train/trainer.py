"""`MedloraTrainer`: the HF `Trainer` with answer-only loss, token counting, a NaN stop and an exact
validation loss. Everything it needs beyond the Trainer's own arguments arrives in one `RunState`,
which the callbacks (train/callbacks.py) share: token counts and the training clock.

`TokenCounter` rather than `TrainingArguments.include_num_input_tokens_seen`: that counts input ids
only (medlora also counts the answer tokens actually trained), sums them over all processes (the
per-process tokens/s here are what each process's clock measures), and does not know TRL's batch
keys (`chosen_attention_mask`, ...), which the preference trainer shares this counter for.

Relies on transformers' `Trainer.compute_loss(model, inputs, return_outputs, num_items_in_batch)`,
`Trainer.log(logs, start_time)` and `Trainer.evaluate` signatures (tested with transformers 5.24).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer

from medlora.data.format import IGNORE_INDEX, Example
from medlora.errors import TrainingError
from medlora.evaluate.loss import score_examples
from medlora.train.kernels.answer_head import answer_loss_sum
from medlora.train.memory import peak_rss_bytes, release_free_memory


class NonFiniteLoss(TrainingError):
    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"loss became {value} at step {step}")
        self.step = step


@dataclass
class TokenCounter:
    """Tokens that went through training steps (counted at the step: the data loader reads ahead).

    SFT rows (padded with an `attention_mask`, or packed without one) and TRL's preference batches:
    DPO `attention_mask` / `completion_mask` (chosen and rejected rows stacked), ORPO
    `{chosen,rejected}_attention_mask` / `{chosen,rejected}_labels`."""

    tokens_seen: int = 0
    answer_tokens_seen: int = 0

    def count(self, inputs: dict[str, Any]) -> None:
        keys = ("attention_mask", "chosen_attention_mask", "rejected_attention_mask")
        masks = [inputs[key] for key in keys if key in inputs]
        if masks:
            self.tokens_seen += sum(int(mask.sum()) for mask in masks)
        else:  # packed rows: no mask; padding is each row's trailing run of untrained positions
            self.tokens_seen += inputs["input_ids"].numel() - packed_padding(inputs)
        if "labels" in inputs:  # SFT: labels are shifted inside the loss
            self.answer_tokens_seen += int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
        if "completion_mask" in inputs:  # DPO
            self.answer_tokens_seen += int(inputs["completion_mask"].sum())
        for key in ("chosen_labels", "rejected_labels"):  # ORPO
            if key in inputs:
                self.answer_tokens_seen += int((inputs[key] != IGNORE_INDEX).sum())


def packed_padding(inputs: dict[str, Any]) -> int:
    """Padding positions of a packed batch (data/pack.py `collate_packed`): in each row, the last
    position run when none of its labels is trained (every real example has answer tokens)."""
    positions = inputs.get("position_ids")
    if positions is None:
        return 0
    padding = 0
    for row_positions, row_labels in zip(positions, inputs["labels"], strict=True):
        last_start = int((row_positions == 0).nonzero().max())
        if last_start > 0 and bool((row_labels[last_start:] == IGNORE_INDEX).all()):
            padding += len(row_positions) - last_start
    return padding


@dataclass
class RunState:
    """What medlora's trainers and callbacks share for one run (SFT and preference alike)."""

    counter: TokenCounter = field(default_factory=TokenCounter)
    stop_on_nan: bool = True
    # SFT only: the unlikelihood weight and the validation set scored by `evaluate`.
    unlikelihood: float = 0.0
    kernels: str = "medlora"  # train.kernels: whose fused head computes the loss
    loraplus_lr_ratio: float | None = None  # train.loraplus_lr_ratio (create_optimizer)
    val_examples: list[Example] = field(default_factory=list)
    val_groups: list[str] = field(default_factory=list)  # the recipe source of each example
    pad_token_id: int = 0
    eval_batch_size: int = 8
    # CPU under train.max_memory_gb: hand freed heap memory back before each forward (see
    # MedloraTrainer.compute_loss).
    trim_between_steps: bool = False
    # The training clock: starts at on_train_begin (model loading is not training), carries the
    # seconds of the run before a resume, and leaves out evaluation.
    previous_seconds: float = 0.0
    clock_start: float | None = None
    eval_seconds: float = 0.0

    def start_clock(self) -> None:
        self.clock_start = time.perf_counter() - self.previous_seconds

    def train_seconds(self) -> float:
        if self.clock_start is None:
            return 0.0
        return time.perf_counter() - self.clock_start - self.eval_seconds


def peak_memory() -> dict[str, float]:
    """Peak memory so far: GPU allocations when on CUDA, else the process's peak resident set
    (across the high-water-mark resets of `tokens_per_batch: auto`'s probes)."""
    if torch.cuda.is_available():
        return {"peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    return {"peak_rss_mb": round(peak_rss_bytes() / 2**20, 1)}


class RunTrainerMixin:
    """What medlora adds to the HF Trainer and to TRL's preference trainers: the run's `RunState`
    (given as `run=`), token counts and the NaN stop at every training step, log rows that carry
    the tokens trained, the training seconds (evaluation excluded) and peak memory, and peft's
    LoRA+ optimizer with `train.loraplus_lr_ratio`."""

    def __init__(self, *args: Any, run: RunState, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run = run

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        result = super().compute_loss(  # type: ignore[misc]
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        self.check_step(model, inputs, result[0] if return_outputs else result)
        return result

    def check_step(self, model: Any, inputs: dict[str, Any], loss: Any) -> None:
        """After a training forward: count the batch's tokens; stop on a loss that is not finite."""
        if not model.training:
            return
        self.run.counter.count(inputs)
        if self.run.stop_on_nan and not torch.isfinite(loss.detach()).all():
            step = self.state.global_step + 1  # type: ignore[attr-defined]
            raise NonFiniteLoss(step, float(loss.detach()))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["tokens_seen"] = self.run.counter.tokens_seen
            logs["trained_tokens"] = self.run.counter.answer_tokens_seen
            logs["train_seconds"] = round(self.run.train_seconds(), 3)
            logs.update(peak_memory())
        super().log(logs, start_time)  # type: ignore[misc]

    def create_optimizer(self, model: Any = None) -> Any:
        """peft's LoRA+ optimizer (B matrices at lr x ratio), built from the optimizer class and
        settings the TrainingArguments name, so `train.optimizer`, the scheduler and checkpoints
        work unchanged."""
        ratio = self.run.loraplus_lr_ratio
        if ratio is None or self.optimizer is not None:  # type: ignore[attr-defined]
            return super().create_optimizer(model)  # type: ignore[misc]
        from peft.optimizers import create_loraplus_optimizer

        model = self.model if model is None else model  # type: ignore[attr-defined]
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)  # type: ignore[attr-defined]
        kwargs = {key: value for key, value in kwargs.items() if key != "lr"}
        self.optimizer = create_loraplus_optimizer(
            model,
            optimizer_cls,
            lr=self.args.learning_rate,  # type: ignore[attr-defined]
            loraplus_lr_ratio=ratio,
            loraplus_weight_decay=self.args.weight_decay,  # type: ignore[attr-defined]
            **kwargs,
        )
        return self.optimizer


class MedloraTrainer(RunTrainerMixin, Trainer):
    """The HF Trainer with answer-only loss, token counting, NaN stop and exact evaluation."""

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if self.run.trim_between_steps and model.training:
            # glibc keeps the freed activations of earlier steps, fragmented: the peak crept up
            # step by step past a budget the probe (which trims first) had measured to hold
            # (docs/training-engine.md, "Other switches", CPU bf16).
            release_free_memory()
        unlikelihood = self.run.unlikelihood if model.training else 0.0
        loss_sum, count, outputs = answer_loss_sum(
            model, inputs, unlikelihood=unlikelihood, kernels=self.run.kernels
        )
        if num_items_in_batch is not None:
            # Token-weighted over the whole optimizer step (all micro-batches, all processes),
            # so packing, padding and accumulation never change the objective.
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients
        else:
            loss = loss_sum / max(count, 1)
        self.check_step(model, inputs, loss)
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        started = time.perf_counter()
        try:
            if self.args.world_size > 1 or not self.run.val_examples:
                return super().evaluate(*args, **kwargs)
            return self._exact_evaluate()
        finally:
            self.run.eval_seconds += time.perf_counter() - started

    def _exact_evaluate(self) -> dict[str, float]:
        """Token-weighted answer loss over the whole validation set, and per data source.

        The same number `medlora eval` reports (Trainer's own loop averages batch means).
        """
        run = self.run
        was_training = self.model.training
        scored = score_examples(self.model, run.val_examples, run.pad_token_id, run.eval_batch_size)
        if was_training:
            self.model.train()
        metrics = {"eval_loss": scored["loss"], "eval_perplexity": scored["perplexity"]}
        groups: dict[str, list[int]] = {}
        for i, group in enumerate(run.val_groups):
            groups.setdefault(group, []).append(i)
        if len(groups) > 1:
            for name, indices in sorted(groups.items()):
                weights = [run.val_examples[i].answer_tokens for i in indices]
                total = sum(
                    scored["per_example_loss"][i] * w for i, w in zip(indices, weights, strict=True)
                )
                metrics[f"eval_loss_{name}"] = total / max(sum(weights), 1)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        return metrics
