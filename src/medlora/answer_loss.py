"""The training objective: cross-entropy on answer tokens only, logits only where they are needed.

A causal LM's head turns every position into vocabulary logits (49k for SmolLM2, 128k for Llama 3):
for a prompt-heavy medical QA row that is most of the step's memory traffic, and the prompt's logits
carry no loss. The model's own `logits_to_keep` argument takes a tensor of positions, so only the
positions whose next token is an answer token go through the head. The call still goes through the
model's forward (and so through DDP/FSDP/DeepSpeed wrappers and PEFT) unchanged.
"""

from __future__ import annotations

from typing import Any

from medlora.data.format import IGNORE_INDEX


def answer_positions(labels: Any) -> tuple[Any, Any]:
    """Positions t whose target labels[t+1] is trained, and those targets (rows x kept positions).

    For one row the kept positions are exactly its answer positions; for several rows they are the
    union, and targets of positions that are not answers in a row stay -100.
    """
    shifted = labels[:, 1:]
    keep = (shifted != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    return keep, shifted[:, keep]


def answer_loss_sum(model: Any, batch: dict[str, Any]) -> tuple[Any, int, Any]:
    """Summed answer-token cross-entropy, the number of answer tokens, and the model outputs."""
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    keep, targets = answer_positions(batch["labels"])
    # use_cache=False: with a cache transformers skips the packed-sequence mask (see data/pack.py).
    outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
    logits = outputs.logits.float()
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, int((targets != IGNORE_INDEX).sum()), outputs
