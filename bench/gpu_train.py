"""GPU training check: the model card's plain HF recipe vs medlora's train(), same examples, one GPU.

    python bench/gpu_train.py                    # on a CUDA machine (bench/gpu_check.sh wraps it)
    python bench/gpu_train.py --tiny --device cpu   # the same code path on a tiny model, < 1 min

The model is a random-initialised Llama with Llama-3.2-3B's exact architecture (hidden 3072, 28
layers, 24 heads, 8 KV heads, intermediate 8192, vocab 128256, llama3 RoPE θ=500000, tied
embeddings), built on the GPU: nothing is downloaded. The data are synthetic medical-QA-shaped
examples (prompt ≈60-120 tokens with labels -100, answer ≈100-400 tokens), seeded, tokenized by a
small BPE trained in-process (its ids are a subset of the model's 128256).

(a) peer: what the Llama 3.2 3B medical model card does by hand. Plain `transformers.Trainer` +
    peft LoRA r=4 on q_proj/v_proj, `DataCollatorForSeq2Seq`, batch 1 x grad accum 4, lr 2e-5
    linear, fp16=True. The weights are loaded in float16 as card users do
    (`torch_dtype=torch.float16`); fp16 AMP on fp16 *trainable* weights fails in the Trainer
    ("Attempting to unscale FP16 gradients"), so the LoRA weights are fp32 master weights (peft's
    default `autocast_adapter_dtype=True` does exactly that) and the GradScaler unscales them.
(b) medlora: `medlora.train.train()` on the same records with `train.packing=true
    train.tokens_per_batch=8192 train.precision=bf16 model.dtype=bfloat16` and the same LoRA (r=4,
    q/v, lr 2e-5 linear), bf16 weights; grad accum 1 so that the time budget stops it finely.
    On a CPU (--device cpu) both stay fp32: transformers refuses bf16 there without use_cpu.

(c) medlora at the peer's memory: (b) with `train.tokens_per_batch=auto` and `train.max_memory_gb`
    set to the peer's measured peak (the issue's bar: faster at <= 1.0x the peer's memory).
(d) the same with `train.kernels=liger` (liger-kernel's RMSNorm, RoPE, SwiGLU and fused linear
    cross-entropy in place of medlora's fused head), skipped where liger-kernel is not installed.
(e) QLoRA: (b) on the same weights saved and reloaded in 4-bit NF4 (`model.quantization=4bit`,
    bitsandbytes), skipped where bitsandbytes is not installed.
(c)-(e) are skipped on a CPU (no GPU peak to hold, no Triton, no bitsandbytes kernels).

Each runs for a fixed number of optimizer steps or `--budget-s` seconds, whichever comes first
(a Trainer callback; it also reaches the Trainer inside train()), and reports trained tokens/s
(all tokens and answer tokens), train time and peak GPU memory (torch.cuda.max_memory_allocated).
Writes OUT/gpu_check.md, OUT/gpu_check.json and OUT/medlora_metrics.jsonl.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _shared  # noqa: F401  (MEDLORA_DATA_DIR: ../shared/datasets, as in make)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing medlora

LLAMA_32_3B = {
    "vocab_size": 128256,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    # config.json spelling (rope_theta + rope_scaling): every transformers 4.x/5.x reads it.
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
}
TINY = {
    **LLAMA_32_3B,
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}

DISEASES = (
    "asthma diabetes anemia hypertension migraine psoriasis hepatitis tuberculosis arthritis lupus "
    "epilepsy glaucoma gout pneumonia bronchitis sinusitis eczema osteoporosis dementia "
    "endometriosis cirrhosis pancreatitis sarcoidosis scleroderma leukemia lymphoma melanoma"
).split()
WORDS = (
    "the a of and or with without in on for to from by is are was may can often rarely usually "
    "patients people children adults doctors symptoms signs treatment therapy medication dose "
    "blood pressure sugar insulin iron vitamin deficiency infection inflammation pain fever cough "
    "fatigue swelling rash nausea vomiting dizziness headache chest breath shortness wheezing "
    "tightness diet exercise sleep stress smoking alcohol weight heart lung liver kidney brain "
    "skin joint bone muscle nerve immune system chronic acute mild severe early late stage risk "
    "factors genetic family history diagnosis test scan biopsy surgery recovery prognosis outlook "
    "management monitoring follow-up antibiotics steroids inhaler vaccine prevention screening "
    "complications daily life quality months years weeks days common rare condition disease"
).split()
QUESTION_STARTS = (
    "What are the symptoms of",
    "How is {} treated? Tell me about",
    "What causes",
    "Is there a cure for",
    "What is the outlook for people with",
    "How is {} diagnosed? Explain",
)


@dataclass
class Settings:
    tiny: bool
    device: str
    out: Path
    budget_s: float
    peer_steps: int
    medlora_steps: int
    examples: int
    tokens_per_batch: int
    seed: int
    prompt_range: tuple[int, int]
    answer_range: tuple[int, int]


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="hidden 64, 2 layers: test the path")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu-check")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds per engine")
    parser.add_argument("--peer-steps", type=int, default=None)
    parser.add_argument("--medlora-steps", type=int, default=None)
    parser.add_argument("--examples", type=int, default=None, help="training examples")
    parser.add_argument("--tokens-per-batch", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny

    def pick(value: Any, full: Any, small: Any) -> Any:
        return value if value is not None else (small if tiny else full)

    return Settings(
        tiny=tiny,
        device=device,
        out=Path(args.out),
        budget_s=pick(args.budget_s, 40.0, 20.0),  # five engines in under 5 minutes
        peer_steps=pick(args.peer_steps, 400, 3),
        medlora_steps=pick(args.medlora_steps, 150, 3),
        examples=pick(args.examples, 1200, 24),
        tokens_per_batch=pick(args.tokens_per_batch, 8192, 512),
        seed=args.seed,
        prompt_range=(60, 120) if not tiny else (40, 60),
        answer_range=(100, 400) if not tiny else (20, 60),
    )


def versions() -> dict[str, str]:
    import importlib.metadata as md

    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "accelerate", "tokenizers", "pydantic", "safetensors"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "missing"
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
        found["cuda"] = str(torch.version.cuda)
    return found


# ---------------------------------------------------------------- synthetic data and tokenizer


def _words(rng: random.Random, n: int) -> str:
    """`n` medical-sounding words in sentences of 6-16 words."""
    out: list[str] = []
    while len(out) < n:
        length = min(rng.randint(6, 16), n - len(out))
        sentence = [rng.choice(WORDS) for _ in range(length)]
        sentence[0] = sentence[0].capitalize()
        out.extend(sentence[:-1] + [sentence[-1] + "."])
    return " ".join(out)


def corpus(rng: random.Random, lines: int) -> list[str]:
    from medlora.config import DEFAULT_SYSTEM_PROMPT

    text = [DEFAULT_SYSTEM_PROMPT] * 20 + [s.format(d) for s in QUESTION_STARTS for d in DISEASES]
    text += [_words(rng, 40) + " " + rng.choice(DISEASES) for _ in range(lines)]
    return text


def build_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Byte-level BPE with a ChatML template, trained here in seconds (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from medlora.models import DEFAULT_CHAT_TEMPLATE

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def make_records(s: Settings, tokenizer: Any, rng: random.Random) -> dict[str, list[Any]]:
    """Train/validation/test records whose formatted prompt and answer hit the target lengths."""
    from medlora.config import DEFAULT_SYSTEM_PROMPT
    from medlora.data.format import prompt_ids
    from medlora.data.records import Record

    sample = _words(rng, 2000)
    per_word = len(tokenizer(sample)["input_ids"]) / 2000  # calibrate tokens per word
    overhead = len(prompt_ids(tokenizer, "", DEFAULT_SYSTEM_PROMPT))
    total = s.examples + 2 * 16
    records = []
    for i in range(total):
        disease = rng.choice(DISEASES)
        start = rng.choice(QUESTION_STARTS).format(disease)
        prompt_target = rng.randint(*s.prompt_range) - overhead
        context = max(prompt_target / per_word - len(start.split()) - 1, 0)
        question = f"{_words(rng, int(context))} {start} {disease}?".strip()
        answer = _words(rng, max(int(rng.randint(*s.answer_range) / per_word), 1))
        records.append(
            Record(
                id=f"syn-{i}",
                question=question,
                answer=answer,
                source="synthetic/gpu-check",
                topic=f"topic-{i}",
            )
        )
    return {
        "train": records[: s.examples],
        "validation": records[s.examples : s.examples + 16],
        "test": records[s.examples + 16 :],
    }


def write_prepared(folder: Path, splits: dict[str, list[Any]]) -> Path:
    from medlora.io import write_jsonl_atomic

    for name, rows in splits.items():
        write_jsonl_atomic(folder / f"{name}.jsonl", [r.to_dict() for r in rows])
    return folder


# ---------------------------------------------------------------- model, timing


def build_model(s: Settings, dtype: Any, pad_token_id: int) -> Any:
    """Random-initialised Llama-3.2-3B (or tiny) built straight on the device in `dtype`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(TINY if s.tiny else LLAMA_32_3B), pad_token_id=pad_token_id)
    torch.manual_seed(s.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate in the target dtype: no fp32 copy of 3B params
    try:
        with torch.device(s.device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    # No blanket .to(dtype): like from_pretrained(dtype=...), RoPE's inv_freq buffer stays fp32.
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model


def rope_summary(model: Any) -> str:
    config = model.config
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return f"rope {params.get('rope_type')} theta {theta}, tied {config.tie_word_embeddings}"


def time_budget_callback(seconds: float) -> Any:
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        """Stop training at the first optimizer step after `seconds` of training."""

        def __init__(self) -> None:
            self.start = time.perf_counter()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if time.perf_counter() - self.start > seconds:
                control.should_training_stop = True

    return TimeBudget()


def reset_memory(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def allocated_gib(device: str) -> float | None:
    """GPU memory still held when an engine starts (the other engine's leftovers would show)."""
    import torch

    if not device.startswith("cuda"):
        return None
    return round(torch.cuda.memory_allocated() / 2**30, 2)


def describe_model(model: Any) -> str:
    params = sum(p.numel() for p in model.parameters())
    return f"{params / 1e9:.3f}B params, {model.config.num_hidden_layers} layers, {rope_summary(model)}"


def peak_gib(device: str) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


# ---------------------------------------------------------------- (a) the peer recipe


def run_peer(s: Settings, tokenizer: Any, splits: dict[str, list[Any]], work: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from medlora.config import DEFAULT_SYSTEM_PROMPT
    from medlora.data.format import format_records

    cuda = s.device.startswith("cuda")
    reset_memory(s.device)
    # Same token ids and answer-only labels as medlora gets (its formatter, its chat template).
    examples, _ = format_records(tokenizer, splits["train"], DEFAULT_SYSTEM_PROMPT, 640)
    rows = [
        {"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
        for e in examples
    ]
    # Card users load fp16 weights; on a CPU (no fp16 AMP) the peer stays fp32.
    start_gib = allocated_gib(s.device)
    model = build_model(s, torch.float16 if cuda else torch.float32, tokenizer.pad_token_id)
    architecture = describe_model(model)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.05,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)  # autocast_adapter_dtype=True: LoRA weights in fp32
    lora_dtypes = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
    seen = {"tokens": 0, "answer": 0}

    class CountingTrainer(Trainer):
        """The plain Trainer; only counts the tokens of each training micro-batch."""

        def compute_loss(self, model: Any, inputs: dict[str, Any], *a: Any, **k: Any) -> Any:
            if model.training:
                seen["tokens"] += int(inputs["attention_mask"].sum())
                seen["answer"] += int((inputs["labels"] != -100).sum())
            return super().compute_loss(model, inputs, *a, **k)

    args = TrainingArguments(
        output_dir=str(work / "peer"),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
        learning_rate=2e-5,
        lr_scheduler_type="linear",
        max_steps=s.peer_steps,
        fp16=cuda,
        optim="adamw_torch",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=s.seed,
        use_cpu=not cuda,
    )
    trainer = CountingTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[time_budget_callback(s.budget_s)],
    )
    start = time.perf_counter()
    output = trainer.train()
    runtime = time.perf_counter() - start
    row = {
        "engine": "peer: HF Trainer + peft (model card)",
        "setup": "fp16 weights, fp32 LoRA, fp16 AMP, batch 1 x 4, padded per example"
        if cuda
        else "fp32 weights (CPU: no fp16 AMP), batch 1 x 4",
        "lora_dtype": ",".join(lora_dtypes),
        "steps": trainer.state.global_step,
        "tokens": seen["tokens"],
        "answer_tokens": seen["answer"],
        "train_s": round(runtime, 2),
        "tokens_per_s": round(seen["tokens"] / runtime, 1),
        "answer_tokens_per_s": round(seen["answer"] / runtime, 1),
        "peak_gib": peak_gib(s.device),
        "start_gib": start_gib,
        "train_loss": round(output.training_loss, 4),
        "model": architecture,
    }
    del trainer, model
    reset_memory(s.device)
    return row


# ---------------------------------------------------------------- (b) medlora's train()


def medlora_overrides(s: Settings) -> list[str]:
    # bf16 on a GPU; the CPU path check stays fp32 (transformers' bf16 on CPU needs use_cpu=True).
    bf16 = s.device.startswith("cuda")
    return [
        "train.packing=true",
        f"train.tokens_per_batch={s.tokens_per_batch}",
        f"train.precision={'bf16' if bf16 else 'fp32'}",
        f"model.dtype={'bfloat16' if bf16 else 'float32'}",
        "lora.r=4",
        "lora.alpha=8",
        "lora.dropout=0.05",
        "lora.target_modules=[q_proj,v_proj]",
        "train.lr=2e-5",
        "train.scheduler=linear",
        "train.grad_accum=1",
        f"train.max_steps={s.medlora_steps}",
        "train.logging_steps=10",
        "train.eval_steps=0",
        "train.save_steps=0",
        "data.max_seq_len=640",
        "data.max_val_examples=16",
        "output.report_to=[jsonl]",
    ]


def saved_base(s: Settings, tokenizer: Any, work: Path) -> Path:
    """The random-init model saved as a model folder once (QLoRA quantizes while loading)."""
    import torch

    folder = work / "base-bf16"
    if not (folder / "config.json").is_file():
        model = build_model(s, torch.bfloat16, tokenizer.pad_token_id)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        reset_memory(s.device)
    return folder


def run_medlora(
    s: Settings,
    tokenizer: Any,
    prepared: Path,
    work: Path,
    engine: str = "medlora train()",
    extra: tuple[str, ...] = (),
    model_folder: Path | None = None,
) -> dict:
    """medlora's train() with `medlora_overrides` plus `extra`; on the built model, or loaded by
    train() itself from `model_folder` (QLoRA: quantized while loading)."""
    import torch
    import transformers.trainer as hf_trainer

    from medlora.config import recipe_from_dict
    from medlora.train import train

    reset_memory(s.device)
    overrides = [*medlora_overrides(s), *extra]
    name = str(model_folder) if model_folder else "random-init-llama-3.2-3b"
    recipe = recipe_from_dict({"model": {"name": name}}, overrides)
    dtype = torch.bfloat16 if recipe.model.dtype == "bfloat16" else torch.float32
    start_gib = allocated_gib(s.device)
    model = None if model_folder else build_model(s, dtype, tokenizer.pad_token_id)
    # train() takes no callbacks: the budget rides on the Trainer's default callback list.
    budget = time_budget_callback(s.budget_s)
    hf_trainer.DEFAULT_CALLBACKS.append(budget)
    run_dir = work / f"medlora-run-{len(list(work.glob('medlora-run-*')))}"
    start = time.perf_counter()
    try:
        result = train(
            recipe,
            run_dir,
            prepared_dir=prepared,
            model_and_tokenizer=None if model is None else (model, tokenizer),
        )
    finally:
        hf_trainer.DEFAULT_CALLBACKS.remove(budget)
    architecture = describe_model(model) if model is not None else f"{name}, {extra}"
    choice = getattr(result, "row_choice", None) or {}  # tokens_per_batch: auto
    row_tokens = choice.get("tokens_per_batch", s.tokens_per_batch)
    checkpointing = " (activation checkpointing)" if choice.get("gradient_checkpointing") else ""
    # The built model carries the adapter after train(); QLoRA's is inside train(): not reported.
    lora_params = model.named_parameters() if model is not None else iter(())
    lora_dtypes = ",".join(sorted({str(p.dtype) for n, p in lora_params if "lora_" in n})) or "?"
    wall = time.perf_counter() - start
    # train_seconds (newer train()): time in training steps, evaluation excluded; else runtime_s.
    runtime = float(getattr(result, "train_seconds", 0.0) or result.runtime_s)
    tokens = int(round(float(result.tokens_per_s) * runtime))
    answer = int(getattr(result, "trained_tokens", 0))
    row = {
        "engine": engine,
        "setup": f"{recipe.model.dtype} weights, {recipe.train.precision}, packing "
        f"{row_tokens} tokens/batch{checkpointing}, accum 1"
        + (f", {' '.join(extra)}" if extra else ""),
        "lora_dtype": lora_dtypes,
        "steps": result.steps,
        "tokens": tokens,
        "answer_tokens": answer,
        "train_s": round(runtime, 2),
        "tokens_per_s": round(float(result.tokens_per_s), 1),
        "answer_tokens_per_s": round(answer / max(runtime, 1e-9), 1),
        "peak_gib": peak_gib(s.device),
        "start_gib": start_gib,
        "model": architecture,
        "train_loss": None if result.train_loss is None else round(result.train_loss, 4),
        "eval_loss": None if result.eval_loss is None else round(result.eval_loss, 4),
        "train_call_s": round(wall, 2),
        "overrides": overrides,
    }
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        shutil.copyfile(metrics, s.out / "medlora_metrics.jsonl")
    del model
    reset_memory(s.device)
    return row


def skipped(engine: str, why: str) -> dict[str, Any]:
    return {"engine": engine, "skipped": why}


def at_peer_memory(
    s: Settings,
    tokenizer: Any,
    prepared: Path,
    work: Path,
    rows: list[dict[str, Any]],
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """(c) / (d): medlora under a memory budget equal to the peer's measured peak."""
    import importlib.util

    engine = "medlora at the peer's memory" + (" + liger" if extra else "")
    peer = rows[0] if rows else {}
    if not s.device.startswith("cuda") or not peer.get("peak_gib"):
        return skipped(engine, "needs CUDA and the peer's peak GPU memory")
    if extra and importlib.util.find_spec("liger_kernel") is None:
        return skipped(engine, "liger-kernel is not installed (pip install liger-kernel)")
    budget = ("train.tokens_per_batch=auto", f"train.max_memory_gb={peer['peak_gib']}")
    return run_medlora(s, tokenizer, prepared, work, engine, budget + extra)


def qlora(s: Settings, tokenizer: Any, prepared: Path, work: Path) -> dict[str, Any]:
    """(e): the same weights in 4-bit NF4, LoRA on top (medlora's QLoRA path)."""
    import importlib.util

    engine = "medlora QLoRA (4-bit NF4)"
    if not s.device.startswith("cuda"):
        return skipped(engine, "needs CUDA")
    if importlib.util.find_spec("bitsandbytes") is None:
        return skipped(engine, "bitsandbytes is not installed")
    folder = saved_base(s, tokenizer, work)
    extra = ("model.quantization=4bit",)
    return run_medlora(s, tokenizer, prepared, work, engine, extra, model_folder=folder)


# ---------------------------------------------------------------- report


def data_stats(tokenizer: Any, splits: dict[str, list[Any]]) -> dict[str, Any]:
    from medlora.config import DEFAULT_SYSTEM_PROMPT
    from medlora.data.format import format_records

    examples, _ = format_records(tokenizer, splits["train"][:200], DEFAULT_SYSTEM_PROMPT, 640)
    prompts = [len(e.input_ids) - e.answer_tokens for e in examples]
    answers = [e.answer_tokens for e in examples]

    def stats(values: list[int]) -> str:
        return f"{min(values)}-{max(values)} (mean {statistics.mean(values):.0f})"

    return {
        "train_examples": len(splits["train"]),
        "prompt_tokens": stats(prompts),
        "answer_tokens": stats(answers),
        "tokenizer_vocab": len(tokenizer),
    }


def _cell(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown(s: Settings, env: dict[str, str], data: dict[str, Any], rows: list[dict]) -> str:
    model = "tiny Llama (hidden 64, 2 layers)" if s.tiny else "random-init Llama-3.2-3B config"
    lines = [
        f"## GPU training check: {model} on {env.get('gpu', s.device)}",
        "",
        "Command: `bash bench/gpu_check.sh` (`python bench/gpu_train.py`), "
        + ", ".join(f"{k} {v}" for k, v in env.items() if k != "gpu")
        + ".",
        f"Data: {data['train_examples']} synthetic examples, prompt tokens {data['prompt_tokens']}"
        f" (labels -100), answer tokens {data['answer_tokens']}; each engine ran up to its step "
        f"limit or {s.budget_s:.0f} s.",
        "",
        f"Model: {next((r['model'] for r in rows if 'model' in r), '?')}.",
        "",
        "| engine | setup | optimizer steps | tokens | answer tokens | train s | tokens/s "
        "| answer tokens/s | peak GPU memory (GiB) | train loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['engine']} | skipped: {r['skipped']} |" + " |" * 8)
            continue
        if "error" in r:
            lines.append(f"| {r['engine']} | FAILED: {r['error'][:300]} |" + " |" * 8)
            continue
        lines.append(
            f"| {r['engine']} | {r['setup']} | {r['steps']} | {_cell(r['tokens'])} "
            f"| {_cell(r['answer_tokens'])} | {_cell(r['train_s'], 1)} | {_cell(r['tokens_per_s'])} "
            f"| {_cell(r['answer_tokens_per_s'])} | {_cell(r['peak_gib'], 2)} "
            f"| {_cell(r['train_loss'], 4)} |"
        )
    peer = rows[0] if rows and rows[0].get("tokens_per_s") else None
    for ours in rows[1:]:
        if peer is None or not ours.get("tokens_per_s"):
            continue
        lines += [
            "",
            f"{ours['engine']} ÷ peer: tokens/s {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x"
            f", answer tokens/s "
            f"{ours['answer_tokens_per_s'] / max(peer['answer_tokens_per_s'], 1e-9):.2f}x"
            + (
                f", peak memory {ours['peak_gib'] / peer['peak_gib']:.2f}x"
                if peer["peak_gib"] and ours["peak_gib"]
                else ""
            )
            + ".",
        ]
    lines += [
        "",
        "Peer: weights in float16 as the card's users load them; fp16 AMP needs fp32 trainable "
        "weights (the Trainer's GradScaler refuses fp16 gradients), so the LoRA weights are fp32 "
        "(peft's autocast_adapter_dtype default). medlora overrides: `"
        + " ".join(medlora_overrides(s))
        + "`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = parse_args(argv)
    s.out.mkdir(parents=True, exist_ok=True)
    env = versions()
    print("versions:", json.dumps(env), flush=True)
    from transformers.utils import logging as hf_logging

    from medlora.io import write_json_atomic, write_text_atomic

    hf_logging.set_verbosity_error()
    rng = random.Random(s.seed)
    tokenizer = build_tokenizer(corpus(rng, 300 if s.tiny else 3000), 500 if s.tiny else 8000)
    splits = make_records(s, tokenizer, rng)
    data = data_stats(tokenizer, splits)
    print("data:", json.dumps(data), flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        prepared = write_prepared(work / "prepared", splits)
        rows: list[dict[str, Any]] = []
        started = time.perf_counter()
        engines = (
            ("peer", lambda: run_peer(s, tokenizer, splits, work)),
            ("medlora", lambda: run_medlora(s, tokenizer, prepared, work)),
            ("medlora at peer memory", lambda: at_peer_memory(s, tokenizer, prepared, work, rows)),
            ("medlora + liger at peer memory",
             lambda: at_peer_memory(s, tokenizer, prepared, work, rows, ("train.kernels=liger",))),
            ("medlora QLoRA", lambda: qlora(s, tokenizer, prepared, work)),
        )  # fmt: skip
        for name, run in engines:
            # One engine failing must not cost the other's numbers (device time is scarce).
            try:
                rows.append(run())
            except Exception as error:  # noqa: BLE001 (reported in the table, then exit 1)
                traceback.print_exc()
                rows.append({"engine": name, "error": f"{type(error).__name__}: {error}"})
                reset_memory(s.device)
            print(f"{name}:", json.dumps(rows[-1]), flush=True)
            summary = {
                "settings": {k: str(v) for k, v in s.__dict__.items()},
                "versions": env,
                "data": data,
                "rows": rows,
                "wall_s": round(time.perf_counter() - started, 1),
            }
            body = markdown(s, env, data, rows)
            write_text_atomic(s.out / "gpu_check.md", body)
            write_json_atomic(s.out / "gpu_check.json", summary)
        print(body, flush=True)
        if any("error" in row for row in rows):
            raise SystemExit(1)
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
