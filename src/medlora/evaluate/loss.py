"""Answer-only loss and perplexity, token-weighted over the whole set.

Only answer positions go through the output layer: for a 49k-token vocabulary the logits of the
prompt would cost more memory than the model itself, and they carry no score. The answer positions
go through it in chunks of at most `CHUNK_ELEMENTS` logits, with the same losses to the last bit
(the memory it saves: docs/benchmarks.md, "memory-budget").

That shortcut is only taken where the model's logits are exactly `head(hidden)` (`has_plain_head`):
Gemma 2 soft-caps them, Cohere and Granite scale them, so those (and any family not checked) go
through the model's own forward, with `logits_to_keep` holding only the answer positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from medlora.data.format import IGNORE_INDEX, Example, pad_batch

CHUNK_ELEMENTS = 1 << 25  # logits per chunk (128 MiB in float32)
# Padded tokens per forward pass on a CPU (a GPU's batch is eval.batch_size alone). Past a couple of
# thousand tokens a CPU forward gets slower per token (the activations leave the cache), and with
# this cap the demo can answer 50 questions per `generate` call (docs/benchmarks.md, "demo-eval").
CPU_BATCH_TOKENS = 2048
# Families whose causal-LM forward is `logits = self.lm_head(hidden_states)` with nothing after it
# (no soft-capping or logit scaling), checked in their transformers modeling files.
# Gemma 3 and OLMo 2: fused in the family matrix (tests/test_families.py); Gemma 2 soft-caps and
# Granite scales its logits by default, so they keep the model's own head.
PLAIN_HEAD_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma3_text", "olmo2"}
)
# Config fields with which a forward changes the logits after the head, and their no-op value:
# Gemma 2/3 `final_logit_softcapping`, Cohere `logit_scale`, Granite `logits_scaling`.
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def has_plain_head(config: Any) -> bool:
    """Whether the model's logits are its output layer's output as is (a checked family, and no
    soft-capping or scaling set in its config)."""
    checked = getattr(config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES
    return checked and all(
        getattr(config, name, None) in (None, neutral) for name, neutral in LOGIT_TRANSFORMS.items()
    )


def _backbone_and_head(model: Any) -> tuple[Any, Any] | None:
    """The transformer body and the output layer (LoRA layers stay injected in both), when the
    logits are the output layer's output as is; else None (the model's forward makes them)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not has_plain_head(getattr(base, "config", None)):
        return None
    try:
        return base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def answer_token_losses(model: Any, batch: dict[str, Any]) -> tuple[float, int, list[float]]:
    """Sum of answer-token cross-entropies in a batch, their count, and per-example mean losses."""
    import torch
    import torch.nn.functional as F

    # Batches are built on the CPU; a model trained on a GPU stays there, so follow its device.
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    parts = _backbone_and_head(model)
    if parts is not None:
        backbone, head = parts
        hidden = backbone(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state[:, :-1]
        kept, targets = hidden[mask], labels[mask]
        rows = max(1, CHUNK_ELEMENTS // head.out_features)
        token_losses = torch.cat(
            [
                F.cross_entropy(head(part).float(), target, reduction="none")
                for part, target in zip(kept.split(rows), targets.split(rows), strict=True)
            ]
        )
    else:
        # The model's own head (soft-capping, scaling), on the answer positions only.
        keep = mask.any(dim=0).nonzero().squeeze(-1)
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=keep,
            use_cache=False,
        ).logits
        token_losses = F.cross_entropy(
            logits[mask[:, keep]].float(), labels[:, keep][mask[:, keep]], reduction="none"
        )
    per_row = torch.zeros(labels.shape[0], dtype=token_losses.dtype, device=token_losses.device)
    per_row.index_add_(0, mask.nonzero()[:, 0], token_losses)
    counts = mask.sum(dim=1).clamp(min=1)
    return float(token_losses.sum()), int(mask.sum()), (per_row / counts).tolist()


def _batches(
    examples: Sequence[Example], batch_size: int, max_tokens: int | None
) -> list[list[int]]:
    """Indices of `examples` in batches, longest first (similar lengths share a batch, so less
    padding is computed), each at most `batch_size` examples and `max_tokens` padded tokens."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            current = batches[-1]
            longest = len(examples[current[0]].input_ids)
            fits = max_tokens is None or (len(current) + 1) * longest <= max_tokens
            if len(current) < batch_size and fits:
                current.append(i)
                continue
        batches.append([i])
    return batches


def scoring_dtype(precision: str, device_type: str) -> Any:
    """The autocast dtype of `eval.precision` on this device: bf16, or None (model.dtype).

    auto is bf16 where it runs natively (an AMX / AVX512-BF16 CPU, a bf16 GPU): faster there,
    the losses nearly unmoved (docs/benchmarks.md, "demo-eval").
    """
    import torch

    if precision == "auto":
        if device_type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:
            from medlora.machine import cpu_has_native_bf16

            native = device_type == "cpu" and cpu_has_native_bf16()
        precision = "bf16" if native else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def score_examples(
    model: Any,
    examples: Sequence[Example],
    pad_token_id: int,
    batch_size: int = 8,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Mean answer-token loss and perplexity of `model` on `examples` (token-weighted).

    `precision`: `eval.precision` (fp32, bf16 or auto; see `scoring_dtype`).
    """
    import torch

    model.eval()
    total, tokens = 0.0, 0
    losses_by_index: dict[int, float] = {}
    device_type = next(model.parameters()).device.type
    on_cpu = device_type == "cpu"
    dtype = scoring_dtype(precision, device_type)
    autocast = torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)
    with torch.inference_mode(), autocast:
        for chunk in _batches(examples, batch_size, CPU_BATCH_TOKENS if on_cpu else None):
            batch = pad_batch([examples[i] for i in chunk], pad_token_id)
            batch_sum, batch_tokens, rows = answer_token_losses(model, batch)
            total += batch_sum
            tokens += batch_tokens
            losses_by_index.update(zip(chunk, rows, strict=True))
    loss = total / max(tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "examples": len(examples),
        "answer_tokens": tokens,
        "per_example_loss": [losses_by_index[i] for i in range(len(examples))],
    }
