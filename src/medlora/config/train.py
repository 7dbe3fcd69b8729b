"""The `lora:` and `train:` sections of a recipe."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from medlora.config.base import _Section


class LoraConfig(_Section):
    r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="Module names to adapt, or 'all-linear'.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    init: Literal["default", "eva"] = Field(
        "default",
        description=(
            "How A starts (B starts at 0 either way, so training starts from the base model): "
            "default (PEFT's random A) or eva (A from the SVD of each layer's inputs on the "
            "training answers, PEFT's EVA; SFT only)."
        ),
    )
    eva_rho: float = Field(
        1.0,
        ge=1.0,
        description="eva: a layer may take up to rho × r ranks (the total stays layers × r).",
    )

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
    kernels: Literal["medlora", "stock", "liger"] = Field(
        "medlora",
        description="Training kernels: medlora = its own (fused answer head; on CPU its norm, "
        "SwiGLU and packed-attention kernels), each skipped with a warning outside "
        "its tested library versions (medlora env lists them); stock = none: transformers + PEFT "
        "+ the Trainer and the model's own loss, the reference; liger = liger-kernel's RMSNorm, "
        "RoPE, SwiGLU and fused linear cross-entropy on a CUDA GPU (pip install liger-kernel).",
    )
    loraplus_lr_ratio: float | None = Field(
        None,
        ge=1,
        allow_inf_nan=False,
        description="LoRA+ (Hayou et al. 2024): the LoRA B matrices learn at lr x this ratio, A at "
        "lr (peft's create_loraplus_optimizer; the paper suggests 16); null: one lr for all.",
    )
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit"] = Field(
        "adamw_torch", description="Optimizer (transformers name)."
    )
    precision: Literal["fp32", "fp16", "bf16", "auto"] = Field(
        "fp32",
        description="Mixed precision: fp16 needs a GPU; bf16 also works on CPU; auto = bf16 where "
        "the GPU or CPU (AMX / AVX512-BF16) does bf16 matmuls natively, else fp16 on a GPU and "
        "fp32 on a CPU.",
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
    shuffle: bool = Field(
        True,
        description="Shuffle training examples each epoch (false: file order, for exact replays).",
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
