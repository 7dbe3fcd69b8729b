"""Recipes: one YAML file validated by pydantic, with `--set section.key=value` overrides.

Every field has a type, a default and a one-line description; the descriptions feed `--help`
and the error messages, so a bad recipe is explained in one line that names the key.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from medlora.errors import ConfigError

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful medical assistant. Answer the question accurately and clearly."
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="Model spec: Hub id, local save_pretrained dir, .gguf file, or alias.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the base weights are loaded in."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Allow custom model code from the Hub.")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="Load the frozen base quantized with bitsandbytes (QLoRA): 4bit = NF4 with "
        "double quantization, computing in model.dtype (bfloat16 unless float16); needs CUDA.",
    )


WEIGHTED_ENTRY_KEYS = ("source", "weight")


def _weight_problem(value: Any) -> str | None:
    """Why `value` is not a usable mixing weight, or None when it is."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "a mixing weight must be a number > 0"
    if not math.isfinite(value) or value <= 0:
        return "a mixing weight must be a finite number > 0"
    return None


class DataConfig(_Section):
    sources: list[str] = Field(
        default_factory=lambda: ["medquad"],
        min_length=1,
        description="Data sources as KIND:PATH (medquad, pubmedqa, jsonl, json, csv, parquet, hf); "
        "an entry may be {source: KIND:PATH, weight: W} to mix sources by weight.",
    )
    weights: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(
        default_factory=dict,
        description="Mixing weight per source entry: its share of the training examples "
        "(entries without one weigh 1; empty: no mixing, the split as prepared).",
    )
    mix_by: Literal["entry", "source"] = Field(
        "entry",
        description="What data.weights name: 'entry' = a recipe source entry (medquad); "
        "'source' = a record's own source (medquad/2_GARD_QA), every one weighing 1 unless "
        "weighted, so each MedQuAD collection gets an equal share of the training examples.",
    )
    map: dict[str, str] = Field(
        default_factory=dict,
        description="Column mapping for tabular sources, e.g. {question: Q, answer: A}.",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="Glob patterns on record source names to leave out, e.g. medquad/9_CDC_QA.",
    )
    system_prompt: str | None = Field(
        DEFAULT_SYSTEM_PROMPT, description="System message put before every question (null: none)."
    )
    max_seq_len: int = Field(
        512, ge=16, description="Longest tokenized example; longer ones are cut."
    )
    val_fraction: float = Field(0.05, ge=0.0, lt=0.5, description="Share of topics for validation.")
    test_fraction: float = Field(0.05, ge=0.0, lt=0.5, description="Share of topics for test.")
    max_train_examples: int | None = Field(
        None, ge=1, description="Use at most this many training examples (seeded sample)."
    )
    max_val_examples: int | None = Field(
        None, ge=1, description="Use at most this many validation examples during training."
    )
    seed: int = Field(0, description="Seed for sampling examples.")
    strict: bool = Field(
        False, description="Fail on a malformed source file instead of skipping it."
    )
    clean: (
        list[
            Literal[
                "question_echo",
                "hpo_table",
                "pointer_answer",
                "source_boilerplate",
                "templated_duplicate",
            ]
        ]
        | None
    ) = Field(
        None,
        description="Answer-hygiene rules (medlora.data.hygiene) for every source; null: all rules "
        "on MedQuAD, none elsewhere; []: none.",
    )
    max_answer_repetition: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Train only on answers whose share of repeated word 4-grams is at most this "
        "(the repetition metric); null: all. Evaluation keeps every reference.",
    )
    truncation: Literal["sentence", "token"] = Field(
        "sentence",
        description="An answer longer than max_seq_len: 'sentence' keeps whole sentences and the "
        "end of turn (the model learns to stop); 'token' cuts mid-sentence.",
    )

    @model_validator(mode="before")
    @classmethod
    def _weighted_entries(cls, data: Any) -> Any:
        """Move `{source, weight}` entries into `weights`, so `sources` stays a list of strings.

        Everything that reads `data.sources` (prepare, eval, the CLI) keeps working unchanged,
        and the resolved recipe.yaml round-trips as `sources` + `weights`.
        """
        if not isinstance(data, dict) or not isinstance(data.get("sources"), list):
            return data
        entries = data["sources"]
        if not any(isinstance(entry, dict) for entry in entries):
            return data
        given = data.get("weights") or {}
        weights = dict(given) if isinstance(given, dict) else given
        sources: list[Any] = []
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                sources.append(entry)
                continue
            key = f"data.sources[{index}]"
            unknown = [k for k in entry if k not in WEIGHTED_ENTRY_KEYS]
            if unknown:
                raise ValueError(
                    f"{key}.{unknown[0]}: unknown key; a weighted entry is "
                    "{source: KIND:PATH, weight: W}"
                )
            spec = entry.get("source")
            if not isinstance(spec, str) or not spec.strip():
                raise ValueError(f"{key}.source is missing: write {{source: KIND:PATH, weight: W}}")
            if "weight" in entry:
                problem = _weight_problem(entry["weight"])
                if problem:
                    raise ValueError(f"{key}.weight={entry['weight']!r}: {problem}")
                if isinstance(weights, dict):
                    if spec in weights and weights[spec] != entry["weight"]:
                        raise ValueError(
                            f"{key}.weight: '{spec}' also has a weight in data.weights; "
                            "give it in one place"
                        )
                    weights[spec] = float(entry["weight"])
            sources.append(spec)
        return {**data, "sources": sources, "weights": weights}

    @model_validator(mode="after")
    def _weights_name_sources(self) -> DataConfig:
        if self.mix_by == "source":  # record sources (medquad/2_GARD_QA): checked at mixing
            return self
        for spec in self.weights:
            if spec not in self.sources:
                raise ValueError(
                    f"data.weights['{spec}']: not one of data.sources "
                    f"({', '.join(self.sources)}); use the source text exactly as listed, "
                    "or drop it (--set data.weights={})"
                )
        return self


class LoraConfig(_Section):
    r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="Module names to adapt, or 'all-linear'.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")

    @field_validator("target_modules")
    @classmethod
    def _not_empty(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one module name, or 'all-linear'")
        return value


PREFERENCE_KINDS = ("jsonl", "json", "parquet", "hf")


class TrainConfig(_Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training split.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    batch_size: int = Field(1, ge=1, description="Examples per device per micro-batch.")
    grad_accum: int = Field(4, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    neftune_noise_alpha: float | None = Field(
        None,
        gt=0,
        description="NEFTune: uniform noise of scale alpha/sqrt(L*d) on the input embeddings while "
        "training (transformers' neftune_noise_alpha; 5 is the paper's usual value; null: off). "
        "With packing, L is the packed row's length.",
    )
    unlikelihood_alpha: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="Token-level unlikelihood weight (Welleck et al. 2020): also lower the "
        "probability of tokens the answer already wrote, against greedy loops; 0: off. "
        "Materializes the answer tokens' logits (no fused head).",
    )
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit"] = Field(
        "adamw_torch", description="Optimizer (transformers name)."
    )
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="Mixed precision: fp16/bf16 need a GPU (bf16 also works on CPU)."
    )
    logging_steps: int = Field(1, ge=1, description="Log metrics every N optimizer steps.")
    eval_steps: int = Field(0, ge=0, description="Validate every N steps (0: only at the end).")
    save_steps: int = Field(
        0, ge=0, description="Checkpoint every N steps (0: only the final adapter)."
    )
    seed: int = Field(42, description="Seed for initialisation and data order.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    packing: bool = Field(
        False,
        description="Pack several examples into one row per micro-batch (no padding; attention and "
        "positions restart per example); batch_size is then replaced by tokens_per_batch.",
    )
    max_memory_gb: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Peak memory the run may use (GiB): process RSS on CPU, allocated memory on "
        "CUDA. With tokens_per_batch: auto the packed row length is measured to fit it.",
    )
    tokens_per_batch: Annotated[int, Field(ge=16)] | Literal["auto"] = Field(
        2048,
        description="Token budget of one packed micro-batch (with packing: true); auto: the "
        "longest row that fits max_memory_gb, measured before the first step.",
    )
    group_by_length: bool = Field(
        False, description="Without packing: batch examples of similar length (less padding)."
    )
    shuffle: bool = Field(
        True,
        description="Shuffle training examples each epoch (false: file order, for exact replays).",
    )
    compile: bool = Field(
        False, description="torch.compile the model (helps on GPUs, static shapes)."
    )
    keep_best: int = Field(
        2, ge=1, description="Checkpoints kept: the best N by validation loss, plus the latest."
    )
    stop_on_nan: bool = Field(
        True, description="Stop at the first NaN/inf loss, keeping the last good checkpoint."
    )
    threads: int | None = Field(
        None, ge=1, description="CPU threads for torch (null: torch default)."
    )
    method: Literal["sft", "dpo", "orpo"] = Field(
        "sft",
        description="sft: answer-only loss on data.sources; dpo/orpo: preference tuning of the "
        "same LoRA adapter on train.preference_data (TRL's DPOTrainer / ORPOTrainer).",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="DPO: KL strength (reward scale); ORPO: weight of the odds-ratio term.",
    )
    preference_data: str | None = Field(
        None,
        description="dpo/orpo pairs: KIND:PATH (jsonl, json, parquet, hf) of prompt/chosen/rejected "
        "rows, or self (chosen = reference answer, rejected = the model's own greedy answer).",
    )
    init_adapter: str | None = Field(
        None,
        description="dpo/orpo: a run directory whose LoRA adapter to continue from (SFT then DPO).",
    )
    self_pairs_min_repetition: float = Field(
        0.0,
        ge=0,
        le=1,
        description="preference_data=self: keep only pairs whose rejected answer repeats at least "
        "this share of its word 4-grams (0: keep all), to aim the pairs at the model's loops.",
    )
    self_pairs_repetition_penalty: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="preference_data=self: repetition_penalty for generating the rejected answers "
        "only (1.0 exposes the loops); null: generation.repetition_penalty. The run keeps its "
        "generation: settings for everything else.",
    )

    @field_validator("preference_data")
    @classmethod
    def _preference_spec(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "self":
            return None if value is None else "self"
        kind, _, path = value.strip().partition(":")
        if kind.strip().lower() not in PREFERENCE_KINDS or not path.strip():
            raise ValueError(
                f"write KIND:PATH with KIND one of {', '.join(PREFERENCE_KINDS)} "
                "(e.g. jsonl:data/pairs.jsonl), or self"
            )
        return value.strip()

    @model_validator(mode="after")
    def _auto_rows_need_a_budget(self) -> TrainConfig:
        if self.tokens_per_batch == "auto" and (self.max_memory_gb is None or not self.packing):
            raise ValueError(
                "train.tokens_per_batch=auto: needs train.max_memory_gb (the budget the row must "
                "fit) and train.packing=true; set both, or give a number of tokens"
            )
        if self.tokens_per_batch == "auto" and self.method != "sft":
            raise ValueError(
                f"train.tokens_per_batch=auto: measured for train.method=sft only, not "
                f"{self.method}; give a number of tokens"
            )
        return self

    @model_validator(mode="after")
    def _preference_needs_data(self) -> TrainConfig:
        if self.method != "sft" and self.preference_data is None:
            raise ValueError(
                f"train.preference_data=None: required with train.method={self.method}; give "
                "KIND:PATH of prompt/chosen/rejected rows (e.g. jsonl:pairs.jsonl) or self"
            )
        if self.method == "sft" and self.init_adapter is not None:
            raise ValueError(
                f"train.init_adapter={self.init_adapter!r}: only used with train.method=dpo or "
                "orpo; drop it (--set train.init_adapter=null) or set train.method"
            )
        return self


class EvalConfig(_Section):
    split: Literal["test", "validation", "train", "all"] = Field(
        "test", description="Split scored by `medlora eval` and the demo."
    )
    max_examples: int | None = Field(64, ge=1, description="Score at most this many examples.")
    batch_size: int = Field(8, ge=1, description="Examples per forward pass when scoring.")
    unseen_sources: list[str] = Field(
        default_factory=list,
        description="KIND:PATH sources never trained on: the demo's headline scores base vs tuned "
        "on them (e.g. medquad:7_SeniorHealth_QA, relative to the MedQuAD folder).",
    )
    metrics: list[Literal["rouge", "f1", "similarity", "repetition", "echo"]] = Field(
        default_factory=lambda: ["rouge", "f1", "similarity", "repetition", "echo"],
        description="Answer metrics the demo reports (with paired bootstrap CIs).",
    )
    num_answers: int = Field(
        3, ge=0, description="Base-vs-tuned answers shown in the demo summary."
    )
    # Quality during training (medlora.train.callbacks); off unless during_training_every > 0.
    during_training_every: int = Field(
        0,
        ge=0,
        description="Score generated answers (and a benchmark sample) every N steps; 0: off.",
    )
    during_training_examples: int = Field(
        8, ge=1, description="Fixed validation questions answered at each during-training check."
    )
    during_training_metrics: list[Literal["rouge", "f1", "similarity"]] = Field(
        default_factory=lambda: ["rouge", "f1"],
        description="Answer scores logged during training as quality_<name>.",
    )
    during_training_max_new_tokens: int = Field(
        64, ge=1, description="Longest answer generated during training checks."
    )
    during_training_benchmark: str | None = Field(
        None, description="Multiple-choice task scored during training (pubmedqa, mmlu_medical, …)."
    )
    during_training_benchmark_data: str | None = Field(
        None, description="KIND:PATH of that task's file (null: under $MEDLORA_DATA_DIR)."
    )
    during_training_benchmark_limit: int = Field(
        32, ge=1, description="Fixed benchmark questions scored at each check."
    )
    best_metric: str | None = Field(
        None,
        description="Logged metric that picks the saved adapter (eval_loss, quality_rougeL, "
        "bench_pubmedqa_acc, …); null: the last step.",
    )
    best_metric_mode: Literal["auto", "min", "max"] = Field(
        "auto", description="auto: lower is better for *loss*/*perplexity*, higher otherwise."
    )


class GenerationConfig(_Section):
    """How every command generates: demo, eval, compare, chat, serve and the exported model."""

    max_new_tokens: int = Field(128, ge=1, description="Longest generated answer.")
    do_sample: bool = Field(False, description="Sample (true) or greedy decoding (false).")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass (with do_sample).")
    repetition_penalty: float = Field(
        1.0, ge=1.0, description="Divide the logits of tokens already present (1.0: off)."
    )
    no_repeat_ngram_size: int = Field(
        0, ge=0, description="Never repeat a word-piece n-gram of this size (0: off)."
    )

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate` (sampling knobs only when sampling)."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }
        if self.do_sample:
            kwargs |= {"temperature": self.temperature, "top_p": self.top_p}
        return kwargs


class OutputConfig(_Section):
    dir: str = Field("runs/demo", description="Run directory (adapter, metrics, charts).")
    report_to: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["jsonl"], description="Metric sinks; jsonl is always written."
    )


class Recipe(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        """Runs written before the `generation` section kept the answer length in `eval`."""
        if isinstance(data, dict) and isinstance(data.get("eval"), dict):
            if "max_new_tokens" in data["eval"]:
                evaluation = dict(data["eval"])
                generation = dict(data.get("generation") or {})
                generation.setdefault("max_new_tokens", evaluation.pop("max_new_tokens"))
                data = {**data, "eval": evaluation, "generation": generation}
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


SECTIONS = tuple(Recipe.model_fields)


def _allowed_keys(section: str) -> str:
    model_cls = Recipe.model_fields[section].annotation
    return ", ".join(model_cls.model_fields)  # type: ignore[union-attr]


def _explain(error: ValidationError) -> str:
    """Turn pydantic's first error into one line naming the key, the value and what is allowed."""
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    key = ".".join(loc)
    if first["type"] == "extra_forbidden":
        if len(loc) == 1:
            return f"unknown recipe section '{loc[0]}': allowed sections are {', '.join(SECTIONS)}"
        section = loc[0]
        return f"unknown key '{key}': allowed keys in '{section}' are {_allowed_keys(section)}"
    message = first["msg"].replace("Value error, ", "")
    if len(loc) == 1 and loc[0] in SECTIONS and first["type"] == "value_error":
        # A whole-section check (e.g. data.sources entries): its message names the key itself.
        if message.startswith(f"{loc[0]}."):
            return f"invalid value {message}"
        return f"invalid {loc[0]} section: {message}"
    value = first.get("input")
    description = ""
    if len(loc) >= 2 and loc[0] in SECTIONS:
        field = Recipe.model_fields[loc[0]].annotation.model_fields.get(loc[1])  # type: ignore[union-attr]
        if field is not None and field.description:
            description = f" ({loc[1]}: {field.description})"
    return f"invalid value {key}={value!r}: {message}{description}"


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set '{item}' must look like section.key=value, e.g. lora.r=16")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2:
        raise ConfigError(
            f"--set '{item}': name the section too, e.g. train.{key}=...; sections: {', '.join(SECTIONS)}"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML: numbers, lists, null, bools)."""
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set '{item}': '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def recipe_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    data = apply_overrides(dict(data or {}), list(overrides or []))
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_explain(error)) from None


def load_recipe(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe (or the defaults when `path` is None) and apply `--set` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        recipe_path = Path(path)
        if not recipe_path.is_file():
            raise ConfigError(f"recipe file not found: {recipe_path} (see recipes/ for examples)")
        try:
            loaded = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(
                f"{recipe_path}{where}: not valid YAML ({error.__class__.__name__})"
            ) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"{recipe_path}: a recipe is a mapping of sections ({', '.join(SECTIONS)})"
            )
        data = loaded or {}
    try:
        return recipe_from_dict(data, overrides)
    except ConfigError as error:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{error}") from None
