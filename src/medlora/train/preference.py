"""Preference tuning (`train.method: dpo | orpo`) of medlora's LoRA adapter with TRL.

train/loop.py `train()` runs every method through one skeleton and one model builder; for dpo / orpo
it takes the batches and trainer from `preference_fit` here: TRL's DPOTrainer or ORPOTrainer on
(question, chosen, rejected) pairs (train/preference_pairs.py) rendered with the run's chat template
and `data.system_prompt`, as SFT trains and serving prompts. The run directory holds the files an
SFT run writes, so eval/serve/export are unchanged.

Tested with TRL 1.16.0 (transformers 5.24, peft 0.21, torch 2.13). TRL internals relied on:
- DPOTrainer given a PeftModel and `ref_model=None` loads no reference model. TRL >= 1.x adds a
  frozen copy of the adapter named "ref" (peft >= 0.20) and takes reference log-probs with it
  active; for a fresh adapter (LoRA B = 0) that is exactly the base with the adapter switched off,
  and with `train.init_adapter` it is the SFT adapter (the usual DPO reference). Only an adapter's
  worth of extra memory. The "ref" adapter is deleted before saving, so the run has one adapter.
- ORPOTrainer and ORPOConfig live in `trl.experimental.orpo` (experimental API in TRL 1.x).
- Both trainers merge their `rewards/*`, `logps/*`, ... metrics into the dict given to
  `Trainer.log`, where the metrics callback (train/callbacks.py) writes them to metrics.jsonl.
- Batch keys for token counts (train/trainer.py `TokenCounter`).
- TRL's `disable_dropout` zeroes the LoRA dropout (PEFT's `nn.Dropout`): off in preference training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medlora import patches
from medlora.config import Recipe
from medlora.data.format import build_messages, split_prompt_answer
from medlora.data.records import Record
from medlora.errors import TrainingError
from medlora.train.arguments import training_arguments
from medlora.train.preference_pairs import (
    PreferencePair,
    load_preference_pairs,
    self_generated_pairs,
)
from medlora.train.run_files import (
    Fit,
    process_state,
    run_callbacks,
    sample_training_records,
)
from medlora.train.trainer import RunState, RunTrainerMixin


def check_preference_recipe(recipe: Recipe) -> Recipe:
    """Fail in one line before any model is loaded (TRL missing or untested, no adapter at
    `train.init_adapter`); the recipe without packing (an SFT batch layout: preference batches are
    chosen/rejected rows, padded)."""
    t = recipe.train
    on, reason = patches.status("trl_preference")  # TRL missing is one of the reasons
    if not on:
        tested = ">=" + ",<".join(patches.PATCHES["trl_preference"].tested)
        raise TrainingError(
            f"train.method={t.method} needs trl{tested} ({reason}): pip install 'trl{tested}', "
            "or train with train.method=sft"
        )
    folder = Path(t.init_adapter or ".").expanduser()
    if t.init_adapter is not None and not (folder / "adapter_config.json").is_file():
        raise TrainingError(
            f"train.init_adapter={t.init_adapter}: no adapter_config.json there; give the run "
            "directory of an earlier `medlora train` (e.g. the SFT run)"
        )
    if t.preference_data != "self":
        assert t.preference_data is not None  # the recipe validator requires it
        load_preference_pairs(t.preference_data)  # a bad file: one line, now
    return recipe.model_copy(update={"train": t.model_copy(update={"packing": False})})


def _dataset_rows(
    method: str, tokenizer: Any, pairs: Sequence[PreferencePair], system_prompt: str | None
) -> list[dict[str, Any]]:
    """DPO: conversational rows (TRL renders the chat template, adding no special tokens).

    ORPO: text rows rendered here, the answer ending at the template's end-of-turn token (TRL's
    ORPO appends EOS to an answer that does not end with it).
    """
    rows: list[dict[str, Any]] = []
    for pair in pairs:
        if method == "dpo":
            rows.append(
                {
                    "prompt": build_messages(pair.question, system_prompt),
                    "chosen": [{"role": "assistant", "content": pair.chosen}],
                    "rejected": [{"role": "assistant", "content": pair.rejected}],
                }
            )
            continue
        prompt, chosen = split_prompt_answer(tokenizer, pair.question, pair.chosen, system_prompt)
        _, rejected = split_prompt_answer(tokenizer, pair.question, pair.rejected, system_prompt)
        rows.append({"prompt": prompt, "chosen": chosen.rstrip(), "rejected": rejected.rstrip()})
    return rows


def _trl_classes(method: str) -> tuple[Any, Any]:
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOConfig, ORPOTrainer


def preference_fit(
    recipe: Recipe,
    run_dir: Path,
    model: Any,
    tokenizer: Any,
    splits: dict[str, list[Record]],
    checkpoint: Path | None,
) -> Fit:
    """DPO / ORPO: the pairs (a file, or generated from the training split), and TRL's trainer with
    medlora's token counts, clock, NaN stop and callbacks."""
    from datasets import Dataset

    t = recipe.train
    pairs, preference = _pairs(recipe, run_dir, model, tokenizer, splits)
    config_cls, trainer_cls = _trl_classes(t.method)
    # TRL's trainer plus medlora's token counts, clock, NaN stop and LoRA+ (train/trainer.py); a
    # class made here because TRL is imported only when a preference method is asked for.
    trainer_cls = type(f"Medlora{trainer_cls.__name__}", (RunTrainerMixin, trainer_cls), {})
    run = RunState(stop_on_nan=t.stop_on_nan, loraplus_lr_ratio=t.loraplus_lr_ratio)
    rows = _dataset_rows(t.method, tokenizer, pairs, recipe.data.system_prompt)
    try:
        trainer = trainer_cls(
            model=model,
            # TRL's configs default bf16 and gradient checkpointing on: the recipe sets both.
            args=training_arguments(
                recipe, run_dir, False, config_cls, beta=t.beta, max_length=recipe.data.max_seq_len
            ),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=run_callbacks(recipe, run_dir, run),
            run=run,
        )
    except ValueError as error:  # TRL's own set-up checks (e.g. a LoRA on lm_head)
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise TrainingError(f"TRL refused train.method={t.method}: {first}") from None
    card = {"preference": preference, "used": {"train": len(pairs), "validation": 0}}
    return Fit(trainer, run, card, len(pairs), 0, advice="Lower train.lr or train.beta")


def _pairs(
    recipe: Recipe, run_dir: Path, model: Any, tokenizer: Any, splits: dict[str, list[Record]]
) -> tuple[list[PreferencePair], dict[str, Any]]:
    """The pairs to train on and what the data card says of them."""
    t = recipe.train
    preference: dict[str, Any] = {"method": t.method, "data": t.preference_data, "beta": t.beta}
    if t.preference_data == "self":
        records, _, _ = sample_training_records(splits["train"], recipe)
        state = process_state()
        if state.device.type != "cpu" and next(model.parameters()).device.type == "cpu":
            model.to(state.device)  # Trainer puts it there anyway: generate on the accelerator
        # Under torchrun the main process generates and writes the pairs; the others reuse them.
        with state.main_process_first():
            pairs, stats = self_generated_pairs(model, tokenizer, records, recipe, run_dir)
        preference.update(records=len(records), **stats)
    else:
        assert t.preference_data is not None  # the recipe validator requires it
        pairs, skipped = load_preference_pairs(t.preference_data)
        preference.update(skipped=skipped)
    if not pairs:
        floor = t.self_pairs_min_repetition
        why = (
            f"no generated answer repeats >= {floor} of its 4-grams; lower "
            "train.self_pairs_min_repetition or raise data.max_train_examples"
            if floor and t.preference_data == "self"
            else "every generated answer equals its reference; use a preference file "
            "(train.preference_data=jsonl:PATH) instead"
        )
        raise TrainingError(f"no preference pair to train on: {why}")
    preference["pairs"] = len(pairs)
    return pairs, preference
