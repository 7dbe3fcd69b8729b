"""The training objective: cross-entropy on answer tokens only, logits only where they are needed.

A causal LM's head turns every position into vocabulary logits (49k for SmolLM2, 128k for Llama 3):
for a prompt-heavy medical QA row that is most of the step's memory traffic, and the prompt's logits
carry no loss. The model's own `logits_to_keep` argument takes a tensor of positions, so only the
positions whose next token is an answer token go through the head. The call still goes through the
model's forward (and so through DDP wrappers and PEFT) unchanged.

In training, for model families whose forward ends in a plain bias-free `lm_head` (allow-listed
in `medlora.evaluate.loss.has_plain_head`, which evaluation's scoring shares), the head is also
fused with the loss: the forward returns the kept hidden states and `_head_cross_entropy` computes
the summed cross-entropy and its gradient chunk by chunk, so the (answer tokens x vocabulary)
logits, their log-softmax and their gradient are never all held at once (the same idea as
torchtune's chunked and Liger's fused linear cross-entropy). Models with soft-capped or scaled
logits (Gemma 2, Cohere, Granite) keep their own head.

Used: every SFT training step, CPU and GPU (train/trainer.py `compute_loss`), and the memory probe
of `tokens_per_batch: auto`. Relies on transformers' `logits_to_keep` forward argument accepting a
tensor of positions, `get_output_embeddings()`, PEFT's `get_base_model()` and torch.compile's
private `_orig_mod` attribute. Tested with transformers 5.24.0, peft 0.21.2, torch 2.13.0.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from medlora import patches
from medlora.data.format import IGNORE_INDEX
from medlora.evaluate.loss import has_plain_head

CHUNK_ELEMENTS = 1 << 25  # logits per chunk on GPUs (128 MiB in float32): big GEMMs, bounded memory
# On a CPU, chunks of 256 answer positions: with SmolLM2's 49k vocabulary faster in bf16 than
# 682-row (2^25-logit) chunks, a little slower in float32, and a smaller float32 logits scratch
# kept between steps (multiple of 64: see `_head_rows`; docs/benchmarks.md, "engine-step").
CPU_CHUNK_ROWS = 256
# Unlikelihood's p(candidate) is clamped here, so -log(1 - p) stays finite.
UL_MAX_PROB = 1 - 1e-5


def answer_positions(labels: Any) -> tuple[Any, Any]:
    """Positions t whose target labels[t+1] is trained, and those targets (rows x kept positions).

    For one row the kept positions are exactly its answer positions; for several rows they are the
    union, and targets of positions that are not answers in a row stay -100.
    """
    shifted = labels[:, 1:]
    keep = (shifted != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    return keep, shifted[:, keep]


def answer_loss_sum(
    model: Any,
    batch: dict[str, Any],
    fused: bool | None = None,
    unlikelihood: float = 0.0,
    kernels: str = "medlora",
) -> tuple[Any, int, Any]:
    """Summed answer-token cross-entropy, the number of answer tokens, and the model outputs.

    `fused` (default: when the model is training) fuses the head with the loss where the model
    allows it; the returned outputs then carry hidden states, not logits, in `.logits`.
    `unlikelihood` > 0 adds that multiple of the unlikelihood term (`unlikelihood_sum`), inside
    the fused head where there is one.
    `kernels` (`train.kernels`): "liger" fuses the head with liger-kernel's fused linear
    cross-entropy (train/kernels/liger.py), "medlora" with `_head_cross_entropy`, "stock" takes
    the model's own `labels=` loss (unlikelihood, which transformers has no loss for, excepted).
    """
    import torch
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    keep, targets = answer_positions(batch["labels"])
    count = int((targets != IGNORE_INDEX).sum())
    if kernels == "stock" and unlikelihood == 0:
        # The reference: the model's own `labels=` loss over full logits, as a hand-written
        # transformers script computes it (a mean over the shifted answer tokens, so x count).
        # use_cache=False: with a cache transformers skips the packed mask (see data/pack.py).
        outputs = model(**inputs, labels=batch["labels"], use_cache=False)
        if count == 0:  # the mean over no token is NaN; the sum is 0 (kept on the graph)
            return outputs.logits.sum() * 0.0, count, outputs
        return outputs.loss * count, count, outputs
    fuse = (model.training if fused is None else fused) and kernels != "stock"
    head = output_head(model) if fuse else None
    if head is not None:
        with head_bypassed(head):
            # use_cache=False: with a cache transformers skips the packed mask (see data/pack.py).
            outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
        hidden = outputs.logits.reshape(-1, outputs.logits.shape[-1])
        flat_targets = targets.reshape(-1)
        if unlikelihood > 0:
            # liger's fused loss has no unlikelihood term: medlora's carries it.
            ids, mask = unlikelihood_candidates(targets, keep)
            loss_sum = _head_cross_entropy().apply(
                hidden, head[2].weight, flat_targets, ids, mask, unlikelihood
            )
        elif kernels == "liger":
            from medlora.train.kernels.liger import liger_head_loss_sum

            loss_sum = liger_head_loss_sum(hidden, head[2].weight, flat_targets)
        else:
            loss_sum = _head_cross_entropy().apply(hidden, head[2].weight, flat_targets)
        return loss_sum, count, outputs
    outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
    logits = outputs.logits.float()
    if unlikelihood > 0:
        # One log-softmax serves both terms (the objective's cost: see unlikelihood_sum).
        log_probs = torch.log_softmax(logits, dim=-1)
        answer = targets != IGNORE_INDEX
        picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        loss_sum = -(picked * answer).sum()
        loss_sum = loss_sum + unlikelihood * unlikelihood_sum(log_probs, targets, keep)
        return loss_sum, count, outputs
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, count, outputs


def unlikelihood_candidates(targets: Any, keep: Any) -> tuple[Any, Any]:
    """Each answer position's unlikelihood candidates: (token ids, mask), both [rows * kept, K].

    At each answer position the candidates are the distinct tokens already written earlier in the
    same answer, minus the target (Welleck et al., ICLR 2020). `targets` [rows, kept] (-100
    off-answer), `keep` the kept positions: a gap between kept positions (a prompt) starts another
    answer of a packed row. Row-major like `targets.reshape(-1)`; K is the most answer tokens of a
    row, and a masked-off slot's id is 0.
    """
    import torch

    rows, kept = targets.shape
    width = max(1, int((targets != IGNORE_INDEX).sum(dim=1).max()) if rows else 1)
    ids = torch.zeros(rows, kept, width, dtype=torch.long, device=targets.device)
    mask = torch.zeros(rows, kept, width, dtype=torch.bool, device=targets.device)
    for row in range(rows):
        valid = targets[row] != IGNORE_INDEX
        tokens = targets[row][valid]
        n = tokens.numel()
        if n < 2:
            continue
        positions = keep[valid]
        starts = torch.ones(n, dtype=torch.long, device=tokens.device)
        starts[1:] = (positions[1:] - positions[:-1] != 1).long()
        answer = starts.cumsum(0)
        earlier = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril(-1)
        earlier &= answer[:, None] == answer[None, :]  # [j, k]: k before j in j's answer
        same = tokens[:, None] == tokens[None, :]
        first = ~(same & earlier).any(dim=1)  # token k's first occurrence in its answer
        ids[row, valid, :n] = tokens[None, :].expand(n, n)
        mask[row, valid, :n] = earlier & first[None, :] & ~same
    return ids.reshape(rows * kept, width), mask.reshape(rows * kept, width)


def unlikelihood_sum(log_probs: Any, targets: Any, keep: Any) -> Any:
    """Token-level unlikelihood (Welleck et al., ICLR 2020), summed over answer tokens.

    The term is -log(1 - p(candidate)) summed over each answer position's candidates
    (`unlikelihood_candidates`): it lowers the probability of copying what the answer already
    said, the source of greedy loops. `log_probs` [rows, kept, vocab] (log-softmax of the logits).
    Models whose head is fused take the same term inside `_head_cross_entropy` instead; this
    materialized form serves the others (soft-capped or scaled logits) and is the fused one's
    reference in the tests.
    """
    import torch

    ids, mask = unlikelihood_candidates(targets, keep)
    flat = log_probs.reshape(-1, log_probs.shape[-1])
    p = flat.gather(1, ids).exp()
    return -(torch.log1p(-p.clamp(max=UL_MAX_PROB)) * mask).sum()


def output_head(model: Any) -> tuple[Any, str, Any] | None:
    """(owner module, attribute name, head) when the head can be fused with the loss, else None.

    Only a plain bias-free `nn.Linear` head of an allow-listed family with full (unsharded) weights:
    LoRA on the head, `modules_to_save`, FSDP/DeepSpeed-sharded or compiled models keep the plain
    logits path.
    """
    import torch

    if not patches.allowed("fused_answer_head"):
        return None
    if hasattr(model, "_orig_mod"):
        return None  # torch.compile'd: swapping a submodule would invalidate the compiled graph
    inner = getattr(model, "module", model)  # DDP / DeepSpeed / accelerate wrappers
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()  # PEFT
    config = getattr(inner, "config", None)
    if not has_plain_head(config):  # soft-capped or scaled logits: the model's forward makes them
        return None
    if not hasattr(inner, "get_output_embeddings"):
        return None
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    weight = head.weight
    if hasattr(weight, "device_mesh") or hasattr(weight, "ds_id"):
        return None  # FSDP2 DTensor or DeepSpeed ZeRO-3 parameter: not a whole local matrix
    if weight.dim() != 2 or tuple(weight.shape) != (config.vocab_size, config.hidden_size):
        return None
    for name, child in inner.named_children():
        if child is head:
            return inner, name, head
    return None


@contextmanager
def head_bypassed(head: tuple[Any, str, Any]) -> Iterator[None]:
    """Within the block the model's forward returns its last hidden states in place of logits."""
    import torch

    owner, name, linear = head
    setattr(owner, name, torch.nn.Identity())
    try:
        yield
    finally:
        setattr(owner, name, linear)


_CPU_BUFFER: dict[str, Any] = {}


def _logits_buffer(rows: int, vocab: int, device: Any) -> Any:
    """A float32 (rows x vocab) scratch for the chunks' logits, softmaxed in place.

    On CPU a fresh vocabulary-sized tensor is a fresh mmap, paid again in page faults on every
    step (slower: docs/benchmarks.md, "engine-step"), so the CPU buffer is kept; on GPUs the
    caching allocator already reuses memory.
    """
    import torch

    if device.type != "cpu":
        return torch.empty((rows, vocab), dtype=torch.float32, device=device)
    buffer = _CPU_BUFFER.get("logits")
    if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != vocab:
        _CPU_BUFFER.pop("logits", None)
        buffer = _CPU_BUFFER["logits"] = torch.empty((rows, vocab), dtype=torch.float32)
    return buffer


def _round_up(count: int, multiple: int) -> int:
    return -(-count // multiple) * multiple


def _head_rows(positions: int, weight: Any) -> tuple[int, int]:
    """Answer positions per chunk, and the multiple each chunk's row count is padded to.

    CPU bf16 chunks are padded to multiples of 64 (one GEMM kernel per shape); the chunk size is a
    multiple of 64 too, so only the last chunk of a step is padded.
    """
    import torch

    if weight.device.type == "cpu":
        rows = min(positions, CPU_CHUNK_ROWS, max(1, CHUNK_ELEMENTS // weight.shape[0]))
        return max(1, rows), 64 if weight.dtype != torch.float32 else 1
    return max(1, min(positions, CHUNK_ELEMENTS // weight.shape[0])), 1


def _chunk_inputs(
    hidden: Any, targets: Any, weight: Any, width_multiple: int
) -> tuple[Any, Any, Any]:
    """A chunk's hidden states in the head's dtype, which rows are trained, and the targets (0 where
    not trained), padded with untrained zero rows to a multiple of `width_multiple`."""
    import torch
    import torch.nn.functional as F

    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0)
    if weight.dtype != torch.float32 and hidden.dtype != weight.dtype:
        # bf16 frozen weights after a float32 norm (CPU bf16): the head's dtype leads.
        hidden = hidden.to(weight.dtype)
    if width_multiple > 1:
        # CPU bf16 matmuls keep a kernel per shape (data/pack.py row_width_multiple).
        pad = _round_up(len(hidden), width_multiple) - len(hidden)
        hidden = F.pad(hidden, (0, 0, 0, pad))
        valid, safe = F.pad(valid, (0, pad)), F.pad(safe, (0, pad))
    return hidden, valid, safe


def _chunk_cross_entropy(
    buffer: Any, chunk: Any, weight: Any, safe: Any, valid: Any
) -> tuple[Any, Any, Any]:
    """The chunk's summed cross-entropy, its logits and each row's softmax denominator. The logits
    (chunk @ weight.T, in the float32 scratch `buffer`) are left as exp(logits - row max), so
    dividing them by the denominator gives the softmax."""
    import torch

    logits = buffer[: len(chunk)]
    if chunk.dtype == torch.float32 and weight.dtype == torch.float32:
        torch.mm(chunk, weight.t(), out=logits)
    else:
        logits.copy_(chunk @ weight.t())
    picked = logits.gather(1, safe[:, None]).squeeze(1)
    peak = logits.amax(dim=-1, keepdim=True)
    norm = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True)
    log_norm = (peak + norm.log()).squeeze(1)
    return ((log_norm - picked) * valid).sum(), logits, norm


def _chunk_unlikelihood(probs: Any, ids: Any, mask: Any, alpha: float, needs_grad: bool) -> Any:
    """alpha * sum_c -log(1 - p(c)) over the chunk's candidates; with `needs_grad` its gradient in
    the logits, sum_c w_c (one_hot(c) - p) with w_c = alpha p(c) / (1 - p(c)), is added to the
    softmax `probs` in place."""
    import torch
    import torch.nn.functional as F

    if len(ids) < len(probs):  # the bf16 padding rows: no candidates
        ids = F.pad(ids, (0, 0, 0, len(probs) - len(ids)))
        mask = F.pad(mask, (0, 0, 0, len(probs) - len(mask)))
    p = probs.gather(1, ids)
    clamped = p.clamp(max=UL_MAX_PROB)
    term = alpha * -(torch.log1p(-clamped) * mask).sum()
    if needs_grad:
        # Zero past the clamp, like autograd through `clamp`.
        w = alpha * p / (1 - clamped) * (mask & (p <= UL_MAX_PROB))
        probs.mul_(1 - w.sum(dim=1, keepdim=True)).scatter_add_(1, ids, w)
    return term


def _head_loss_and_grads(
    hidden: Any,
    weight: Any,
    targets: Any,
    candidates: tuple[Any, Any] | None,
    alpha: float,
    needs_hidden: bool,
    needs_weight: bool,
) -> tuple[Any, Any, Any]:
    """The fused head's summed loss and its gradients in `hidden` and `weight` (None where not
    needed), chunk by chunk (`_head_cross_entropy` says what is summed)."""
    import torch

    needs_grad = needs_hidden or needs_weight
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.zeros_like(hidden) if needs_hidden else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_weight else None
    rows, width_multiple = _head_rows(hidden.shape[0], weight)
    buffer = _logits_buffer(_round_up(rows, width_multiple), weight.shape[0], hidden.device)
    for start in range(0, hidden.shape[0], rows):
        part = slice(start, start + rows)
        chunk, valid, safe = _chunk_inputs(hidden[part], targets[part], weight, width_multiple)
        if not bool(valid.any()):
            continue
        loss, logits, norm = _chunk_cross_entropy(buffer, chunk, weight, safe, valid)
        total += loss
        if not (needs_grad or candidates is not None):
            continue
        probs = logits.div_(norm)  # softmax, in place
        if candidates is not None:
            ids, mask = candidates
            total += _chunk_unlikelihood(probs, ids[part], mask[part], alpha, needs_grad)
        if not needs_grad:
            continue
        # d CE / d logits = softmax - one_hot(target), zero for untrained rows; in place.
        probs[torch.arange(len(safe), device=probs.device), safe] -= 1.0
        grad_logits = probs.mul_(valid[:, None]).to(chunk.dtype)
        if needs_hidden:
            grad_hidden[part] = (grad_logits @ weight)[: len(hidden[part])]
        if needs_weight:
            grad_weight += (grad_logits.t() @ chunk).float()
    return total, grad_hidden, grad_weight


@functools.cache  # built on first use: importing this module does not import torch
def _head_cross_entropy() -> Any:
    import torch

    class _HeadCrossEntropy(torch.autograd.Function):
        """sum_t CE(hidden_t @ weight.T, target_t) over targets != -100, with its gradient; with
        unlikelihood candidates (`unlikelihood_candidates`), plus `alpha` times their
        sum_c -log(1 - p_t(c)).

        The gradient is computed in the forward, chunk by chunk (softmax minus one-hot, times the
        weight), so no vocabulary-sized tensor outlives its chunk; backward only scales it.
        """

        @staticmethod
        def forward(
            ctx: Any,
            hidden: Any,
            weight: Any,
            targets: Any,
            candidate_ids: Any = None,
            candidate_mask: Any = None,
            alpha: float = 0.0,
        ) -> Any:
            with_ul = candidate_ids is not None and alpha > 0
            candidates = (candidate_ids, candidate_mask) if with_ul else None
            needs_hidden, needs_weight = ctx.needs_input_grad[:2]
            total, grad_hidden, grad_weight = _head_loss_and_grads(
                hidden, weight, targets, candidates, alpha, needs_hidden, needs_weight
            )
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.weight_dtype = weight.dtype
            return total

        @staticmethod
        def backward(ctx: Any, grad_total: Any) -> tuple[Any, ...]:
            grad_hidden, grad_weight = ctx.saved_tensors
            scale = grad_total.to(torch.float32)
            if grad_hidden is not None:
                grad_hidden = grad_hidden * scale.to(grad_hidden.dtype)
            if grad_weight is not None:
                grad_weight = (grad_weight * scale).to(ctx.weight_dtype)
            return grad_hidden, grad_weight, None, None, None, None

    return _HeadCrossEntropy
