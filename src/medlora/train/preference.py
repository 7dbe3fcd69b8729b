"""Preference tuning (`train.method: dpo | orpo`) of medlora's LoRA adapter with TRL.

train.train() calls `train_preference` when the recipe's method is not `sft`. The model is the same
PEFT LoRA model as in SFT (or the adapter of an earlier run, `train.init_adapter`), trained with
TRL's DPOTrainer or ORPOTrainer on (question, chosen, rejected) pairs rendered with the run's chat
template and `data.system_prompt`, so prompts match SFT training and serving. The run directory
gets what SFT writes (adapter, tokenizer files, recipe.yaml, metrics.jsonl through train.py's
metrics callback, charts, data_card.json, train_summary.json), so eval/serve/export are unchanged.

Pairs (`train.preference_data`):
- `KIND:PATH` with KIND jsonl, json, parquet or hf: rows with `prompt`/`chosen`/`rejected` strings
  (the prompt is the user's question), or chat-style lists of {role, content} messages (chosen and
  rejected whole conversations, or a `prompt` message list with assistant-only chosen/rejected).
- `self` (SPIN-style): for the run's QA training records, chosen = the reference answer, rejected =
  the model's own greedy answer before this run, generated in batches and cached in
  RUN_DIR/preference_pairs.jsonl (rows keyed by record and generation settings, reused on rerun).
  `train.self_pairs_min_repetition` keeps only pairs whose rejected answer loops (its share of
  repeated word 4-grams), so DPO pushes against the loops rather than the answers' content.

Tested with TRL 1.16.0 (transformers 5.24, peft 0.21, torch 2.13). TRL internals relied on:
- DPOTrainer given a PeftModel and `ref_model=None` loads no reference model. TRL >= 1.x adds a
  frozen copy of the adapter named "ref" (peft >= 0.20) and takes reference log-probs with it
  active; for a fresh adapter (LoRA B = 0) that is exactly the base with the adapter switched off,
  and with `train.init_adapter` it is the SFT adapter (the usual DPO reference). Only an adapter's
  worth of extra memory. The "ref" adapter is deleted before saving, so the run has one adapter.
- ORPOTrainer and ORPOConfig live in `trl.experimental.orpo` (experimental API in TRL 1.x).
- Both trainers merge their `rewards/*`, `logps/*`, ... metrics into the dict given to
  `Trainer.log`, where train.py's metrics callback writes them to metrics.jsonl.
- Batch keys for token counts: DPO `attention_mask`/`completion_mask` (chosen and rejected rows
  stacked), ORPO `{chosen,rejected}_attention_mask` / `{chosen,rejected}_labels`.
- TRL's `disable_dropout` zeroes `nn.Dropout` modules only, so medlora's CPU FastDropout swap is not
  applied here (dropout is off in preference training, as TRL intends).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlora.config import PREFERENCE_KINDS, Recipe
from medlora.data.format import (
    IGNORE_INDEX,
    build_messages,
    format_record,
    split_prompt_answer,
)
from medlora.data.records import Record
from medlora.errors import DataError, TrainingError
from medlora.io import append_jsonl, write_json_atomic, write_jsonl_atomic, write_text_atomic

PAIRS_FILE = "preference_pairs.jsonl"
MIN_TRL = "1.16"
ROW_HINT = "preference rows need prompt, chosen and rejected strings (or chosen/rejected chat message lists)"


@dataclass
class PreferencePair:
    """One preference example: the user's question, the preferred and the dispreferred answer."""

    question: str
    chosen: str
    rejected: str
    id: str = ""


# ---------------------------------------------------------------------------------------------
# Reading preference files


def _content(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    value = message.get("content")
    return value.strip() if isinstance(value, str) else ""


def _question_and_answer(value: Any) -> tuple[str, str]:
    """(first user turn, last assistant turn) of a message list; ("", text) for a plain string."""
    if isinstance(value, str):
        return "", value.strip()
    if not isinstance(value, list):
        return "", ""
    question = next(
        (_content(m) for m in value if isinstance(m, dict) and m.get("role") == "user"), ""
    )
    answers = [_content(m) for m in value if isinstance(m, dict) and m.get("role") == "assistant"]
    return question, answers[-1] if answers else ""


def rows_to_pairs(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], where: str
) -> tuple[list[PreferencePair], dict[str, int]]:
    """Preference rows → pairs; a missing column is a DataError naming it, bad rows are counted."""
    present = set(columns)
    listed = ", ".join(columns) or "none"
    for column in ("chosen", "rejected"):
        if column not in present:
            raise DataError(f"{where}: missing column '{column}' (columns: {listed}); {ROW_HINT}")
    pairs: list[PreferencePair] = []
    skipped: dict[str, int] = {}
    for index, row in enumerate(rows):
        prompt_question, _ = _question_and_answer(row.get("prompt"))
        if isinstance(row.get("prompt"), str):
            prompt_question = row["prompt"].strip()
        chosen_question, chosen = _question_and_answer(row.get("chosen"))
        _, rejected = _question_and_answer(row.get("rejected"))
        question = prompt_question or chosen_question
        if not question and "prompt" not in present:
            raise DataError(f"{where}: missing column 'prompt' (columns: {listed}); {ROW_HINT}")
        reason = (
            "empty_prompt"
            if not question
            else "empty_chosen"
            if not chosen
            else "empty_rejected"
            if not rejected
            else "chosen_equals_rejected"
            if chosen == rejected
            else None
        )
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        row_id = row.get("id")
        pairs.append(PreferencePair(question, chosen, rejected, str(row_id or f"pair-{index}")))
    if not pairs:
        raise DataError(f"{where}: no usable preference pair ({skipped or 'no rows'}); {ROW_HINT}")
    return pairs, skipped


def load_preference_pairs(spec: str) -> tuple[list[PreferencePair], dict[str, int]]:
    """Pairs from `KIND:PATH` (jsonl, json, parquet or hf:DATASET_ID, its train split)."""
    from medlora.data.tabular import _columns_of, _read_json, _read_jsonl, _read_parquet

    kind, _, raw_path = spec.partition(":")
    kind, raw_path = kind.strip().lower(), raw_path.strip()
    if kind not in PREFERENCE_KINDS or not raw_path:
        raise DataError(
            f"train.preference_data={spec!r}: write KIND:PATH with KIND one of "
            f"{', '.join(PREFERENCE_KINDS)}, or self"
        )
    if kind == "hf":
        import datasets

        try:
            dataset = datasets.load_dataset(raw_path, split="train")
        except Exception as err:  # offline, unknown id, gated: all mean "not loadable"
            reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
            raise DataError(
                f"train.preference_data=hf:{raw_path} could not be loaded from the Hub (offline? "
                f"{reason}); download it and use jsonl:PATH or parquet:PATH instead"
            ) from err
        return rows_to_pairs(list(dataset), list(dataset.column_names), f"hf:{raw_path}")
    import os

    path = Path(os.path.expanduser(os.path.expandvars(raw_path)))
    if not path.is_file():
        raise DataError(
            f"train.preference_data: {kind} file not found: {path}; check the path in {kind}:PATH"
        )
    if kind == "parquet":
        rows, columns = _read_parquet(path)
    else:
        rows = _read_jsonl(path) if kind == "jsonl" else _read_json(path)
        columns = _columns_of(rows)
    if not rows:
        raise DataError(f"{path}: no rows found; {ROW_HINT}")
    return rows_to_pairs(rows, columns, str(path))


# ---------------------------------------------------------------------------------------------
# Self-generated pairs (SPIN-style)


class _InputsOnModelDevice:
    """`generate_answers` builds CPU tensors; this moves them to the model's device for generate."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.device = next(model.parameters()).device

    def eval(self) -> Any:
        return self.model.eval()

    def generate(self, **kwargs: Any) -> Any:
        moved = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in kwargs.items()}
        return self.model.generate(**moved).cpu()

    def __getattr__(self, name: str) -> Any:  # anything else generate_answers may read
        return getattr(self.model, name)


def pair_generation(recipe: Recipe) -> Any:
    """The generation settings of the rejected answers: the recipe's, with
    train.self_pairs_repetition_penalty in place of its repetition_penalty when set."""
    penalty = recipe.train.self_pairs_repetition_penalty
    if penalty is None:
        return recipe.generation
    return recipe.generation.model_copy(update={"repetition_penalty": penalty})


def _generate(model: Any, tokenizer: Any, questions: list[str], recipe: Recipe) -> list[str]:
    """Greedy answers: the one call into medlora.evaluate.generate (its signature may change)."""
    from medlora.evaluate.generate import generate_answers

    return generate_answers(
        _InputsOnModelDevice(model),
        tokenizer,
        questions,
        recipe.data.system_prompt,
        pair_generation(recipe),
        batch_size=recipe.eval.batch_size,
    )


def _pair_key(recipe: Recipe, record: Record) -> str:
    """Same key = same prompt, reference answer, model and generation settings: reuse the row."""
    parts = [
        recipe.model.name,
        recipe.model.revision,
        recipe.train.init_adapter,
        recipe.data.system_prompt,
        pair_generation(recipe).model_dump(),
        record.id,
        record.question,
        record.answer,
    ]
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()[:24]


def _read_cached_rows(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of an earlier (maybe interrupted) run by key; a half-written last line is ignored."""
    if not path.is_file():
        return {}
    rows: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("key"), str) and "rejected" in row:
            rows[row["key"]] = row
    return rows


def self_generated_pairs(
    model: Any, tokenizer: Any, records: Sequence[Record], recipe: Recipe, run_dir: Path
) -> tuple[list[PreferencePair], dict[str, int]]:
    """chosen = reference answer, rejected = the model's greedy answer; cached in PAIRS_FILE.

    Generated rows are appended batch by batch, so an interrupted run keeps what it made; at the
    end the file is rewritten with exactly this run's records, in order.
    """
    from medlora.progress import progress_bar

    path = run_dir / PAIRS_FILE
    keys = [_pair_key(recipe, record) for record in records]
    cached = _read_cached_rows(path)
    todo = [i for i, key in enumerate(keys) if key not in cached]
    if todo:
        chunk = max(recipe.eval.batch_size, 1) * 4
        with progress_bar() as progress:
            task = progress.add_task("rejected answers (greedy, self)", total=len(todo))
            for start in range(0, len(todo), chunk):
                indices = todo[start : start + chunk]
                answers = _generate(
                    model, tokenizer, [records[i].question for i in indices], recipe
                )
                for i, answer in zip(indices, answers, strict=True):
                    row = {
                        "key": keys[i],
                        "id": records[i].id,
                        "prompt": records[i].question,
                        "chosen": records[i].answer,
                        "rejected": answer,
                    }
                    cached[keys[i]] = row
                    append_jsonl(path, row)
                progress.advance(task, len(indices))
    rows = [cached[key] for key in keys]
    write_jsonl_atomic(path, rows)
    from medlora.evaluate.quality import repeated_ngram_share

    min_repetition = recipe.train.self_pairs_min_repetition
    pairs, skipped = [], {}
    for row in rows:
        if row["rejected"].strip() == row["chosen"].strip():
            skipped["chosen_equals_rejected"] = skipped.get("chosen_equals_rejected", 0) + 1
            continue
        if min_repetition and repeated_ngram_share(row["rejected"]) < min_repetition:
            skipped["rejected_repeats_less"] = skipped.get("rejected_repeats_less", 0) + 1
            continue
        pairs.append(PreferencePair(row["prompt"], row["chosen"], row["rejected"], row["id"]))
    stats = {"generated": len(todo), "reused": len(rows) - len(todo), **skipped}
    return pairs, stats


# ---------------------------------------------------------------------------------------------
# Model, datasets, trainer


def _require_trl(method: str) -> None:
    if importlib.util.find_spec("trl") is None:
        raise TrainingError(
            f"train.method={method} needs TRL, which is not installed: pip install 'trl>={MIN_TRL}'"
        )


def _check_init_adapter(recipe: Recipe) -> Path | None:
    spec = recipe.train.init_adapter
    if spec is None:
        return None
    folder = Path(spec).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise TrainingError(
            f"train.init_adapter={spec}: no adapter_config.json there; give the run directory of "
            "an earlier `medlora train` (e.g. the SFT run)"
        )
    return folder


def _build_model(
    recipe: Recipe, model_and_tokenizer: tuple[Any, Any] | None, init_adapter: Path | None
) -> tuple[Any, Any]:
    """The SFT LoRA model (no packing, no FastDropout), or the base plus `init_adapter`."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from medlora.models import load_recipe_model

    model, tokenizer = model_and_tokenizer or load_recipe_model(recipe)
    if init_adapter is not None:
        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    else:
        lora = recipe.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                bias=lora.bias,
                task_type="CAUSAL_LM",
            ),
        )
    if not torch.cuda.is_available():
        from medlora.train.kernels.rms_norm import use_fast_rms_norm

        use_fast_rms_norm(model)  # CPU: a frozen-weight norm in 3 + 4 passes instead of ~18
    if recipe.train.gradient_checkpointing:
        model.enable_input_require_grads()
    return model, tokenizer


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


def _count_tokens(counter: Any, inputs: dict[str, Any]) -> None:
    """All real tokens of the batch, and the completion (chosen + rejected answer) tokens."""
    for key in ("attention_mask", "chosen_attention_mask", "rejected_attention_mask"):
        if key in inputs:
            counter.tokens_seen += int(inputs[key].sum())
    if "completion_mask" in inputs:  # DPO
        counter.answer_tokens_seen += int(inputs["completion_mask"].sum())
    for key in ("chosen_labels", "rejected_labels"):  # ORPO
        if key in inputs:
            counter.answer_tokens_seen += int((inputs[key] != IGNORE_INDEX).sum())


def _medlora_trainer(base: Any) -> Any:
    """TRL's trainer plus what train.py's callbacks read: token counts, clock, NaN stop."""
    import torch

    from medlora.train import NonFiniteLoss, TokenAndClockLogs

    class PreferenceTrainer(TokenAndClockLogs, base):  # type: ignore[misc, valid-type]
        token_counter: Any
        stop_on_nan: bool = True

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            if model.training:
                _count_tokens(self.token_counter, inputs)
                loss = result[0] if return_outputs else result
                if self.stop_on_nan and not torch.isfinite(loss.detach()).all():
                    raise NonFiniteLoss(self.state.global_step + 1, float(loss.detach()))
            return result

    PreferenceTrainer.__name__ = f"Medlora{base.__name__}"
    return PreferenceTrainer


def _preference_args(config_cls: Any, recipe: Recipe, run_dir: Path) -> Any:
    from medlora.train import _supported_arguments, training_kwargs

    kwargs = training_kwargs(recipe, run_dir, has_eval=False)
    kwargs.update(beta=recipe.train.beta, max_length=recipe.data.max_seq_len)
    # TRL's configs default bf16 and gradient checkpointing on: kwargs set both from the recipe.
    return config_cls(**_supported_arguments(config_cls, kwargs))


# ---------------------------------------------------------------------------------------------
# Measuring


def preference_margins(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    system_prompt: str | None,
    max_seq_len: int,
    batch_size: int = 8,
) -> list[float]:
    """log p(chosen | prompt) − log p(rejected | prompt) per pair, summed over answer tokens.

    Rendered exactly as SFT trains (medlora.data.format); pairs whose answer is cut away entirely
    by `max_seq_len` are left out.
    """
    from medlora.evaluate.loss import score_examples

    examples = []
    for pair in pairs:
        chosen = format_record(
            tokenizer,
            Record(pair.id, pair.question, pair.chosen, "pref"),
            system_prompt,
            max_seq_len,
        )
        rejected = format_record(
            tokenizer,
            Record(pair.id, pair.question, pair.rejected, "pref"),
            system_prompt,
            max_seq_len,
        )
        if chosen is not None and rejected is not None:
            examples += [chosen, rejected]
    scored = score_examples(model, examples, tokenizer.pad_token_id, batch_size)
    sums = [
        loss * example.answer_tokens
        for loss, example in zip(scored["per_example_loss"], examples, strict=True)
    ]
    # Losses are negative log-probs: margin = NLL(rejected) − NLL(chosen).
    return [sums[i + 1] - sums[i] for i in range(0, len(sums), 2)]


# ---------------------------------------------------------------------------------------------
# Training


def train_preference(
    recipe: Recipe,
    run_dir: Path,
    *,
    prepared_dir: str | Path | None = None,
    resume: bool = False,
    model_and_tokenizer: tuple[Any, Any] | None = None,
) -> Any:
    """DPO/ORPO on the recipe's LoRA adapter; the run directory looks like an SFT run's."""
    import torch
    from transformers import set_seed

    from medlora import train as sft

    t, d = recipe.train, recipe.data
    # Fail in one line before any model is loaded.
    _require_trl(t.method)
    init_adapter = _check_init_adapter(recipe)
    file_pairs: list[PreferencePair] | None = None
    skipped: dict[str, int] = {}
    if t.preference_data != "self":
        assert t.preference_data is not None  # the recipe validator requires it
        file_pairs, skipped = load_preference_pairs(t.preference_data)
    sft._check_writable(run_dir)
    if t.threads:
        torch.set_num_threads(t.threads)
    set_seed(t.seed)
    # Packing is an SFT batch layout: preference batches are chosen/rejected rows, padded.
    recipe = recipe.model_copy(update={"train": t.model_copy(update={"packing": False})})
    t = recipe.train

    model, tokenizer = _build_model(recipe, model_and_tokenizer, init_adapter)
    card: dict[str, Any] = {}
    preference: dict[str, Any] = {"method": t.method, "data": t.preference_data, "beta": t.beta}
    if file_pairs is None:
        splits, card = sft.load_or_prepare_splits(
            recipe, run_dir / "data", tokenizer, Path(prepared_dir) if prepared_dir else None
        )
        from medlora.data.hygiene import drop_repetitive
        from medlora.data.mix import training_records

        pool, _ = drop_repetitive(splits["train"], d.max_answer_repetition)
        records, _ = training_records(pool, d.weights, d.max_train_examples, d.seed, d.mix_by)
        from accelerate import PartialState

        state = PartialState()
        if state.device.type != "cpu" and next(model.parameters()).device.type == "cpu":
            model.to(state.device)  # Trainer puts it there anyway: generate on the accelerator
        # Under torchrun the main process generates and writes the pairs; the others reuse them.
        with state.main_process_first():
            pairs, stats = self_generated_pairs(model, tokenizer, records, recipe, run_dir)
        preference.update(records=len(records), **stats)
    else:
        pairs = file_pairs
        preference.update(skipped=skipped)
    if not pairs:
        floor = recipe.train.self_pairs_min_repetition
        why = (
            f"no generated answer repeats >= {floor} of its 4-grams; lower "
            "train.self_pairs_min_repetition or raise data.max_train_examples"
            if floor and file_pairs is None
            else "every generated answer equals its reference; use a preference file "
            "(train.preference_data=jsonl:PATH) instead"
        )
        raise TrainingError(f"no preference pair to train on: {why}")
    preference["pairs"] = len(pairs)
    card["preference"] = preference
    card["used"] = {"train": len(pairs), "validation": 0}
    write_json_atomic(run_dir / "data_card.json", card)
    write_text_atomic(run_dir / "recipe.yaml", recipe.to_yaml())

    from datasets import Dataset

    config_cls, trainer_cls = _trl_classes(t.method)
    counter = sft.TokenCounter()
    metrics_path = run_dir / "metrics.jsonl"
    checkpoint = sft.last_checkpoint(run_dir) if resume else None
    if checkpoint is None and metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log
    trainer_ref: dict[str, Any] = {}
    try:
        trainer = _medlora_trainer(trainer_cls)(
            model=model,
            args=_preference_args(config_cls, recipe, run_dir),
            train_dataset=Dataset.from_list(
                _dataset_rows(t.method, tokenizer, pairs, d.system_prompt)
            ),
            processing_class=tokenizer,
            callbacks=[
                sft._metrics_callback(metrics_path),
                sft._checkpoint_callback(trainer_ref, t.keep_best),
                *sft._tracking_callbacks(recipe, run_dir),
            ],
        )
    except ValueError as error:  # TRL's own set-up checks (e.g. a LoRA on lm_head)
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise TrainingError(f"TRL refused train.method={t.method}: {first}") from None
    trainer_ref["trainer"] = trainer
    trainer.token_counter = counter
    trainer.stop_on_nan = t.stop_on_nan
    previous_seconds = 0.0
    if checkpoint is not None:
        state = json.loads((checkpoint / sft.CHECKPOINT_STATE).read_text(encoding="utf-8"))
        counter.tokens_seen = state["tokens_seen"]
        counter.answer_tokens_seen = state["answer_tokens_seen"]
        previous_seconds = state["train_seconds"]
        sft._truncate_metrics(metrics_path, state["step"])
    trainer_ref["previous_seconds"] = previous_seconds
    start = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except sft.NonFiniteLoss as error:
        good = sft.last_checkpoint(run_dir)
        kept = f"last good checkpoint: {good}" if good else "no checkpoint was saved yet"
        raise TrainingError(
            f"{error}; training stopped ({kept}). Lower train.lr or train.beta, then run again "
            "(with --resume to start from the checkpoint)"
        ) from None
    except OSError as error:
        raise TrainingError(
            f"could not write to {run_dir}: {error.strerror or error}; completed checkpoints are "
            "intact: free disk space and run again with --resume"
        ) from None
    runtime = time.perf_counter() - start
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(unwrapped, "peft_config", {}):
        unwrapped.delete_adapter("ref")  # DPO's frozen reference copy: not part of the result
    sft._save_run_files(trainer, tokenizer, run_dir)
    result = sft.TrainResult(
        run_dir=run_dir,
        train_examples=len(pairs),
        val_examples=0,
        steps=trainer.state.global_step,
        train_loss=output.training_loss,
        eval_loss=None,
        runtime_s=round(runtime, 2),
        train_seconds=round(trainer.train_seconds(), 2),
        tokens_per_s=round(counter.tokens_seen / max(trainer.train_seconds(), 1e-9), 2),
        trained_tokens=counter.answer_tokens_seen,
        **sft.peak_memory(),
    )
    if not trainer.is_world_process_zero():
        return result
    from medlora.train.charts import plot_training_charts

    plot_training_charts(metrics_path, run_dir / "charts")
    write_json_atomic(run_dir / "train_summary.json", result.to_dict())
    return result
