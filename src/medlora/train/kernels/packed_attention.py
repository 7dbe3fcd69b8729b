"""Attention for packed rows without the quadratic mask: each example attends to itself only.

transformers' sdpa path handles a packed row (position_ids restarting at 0) with a block-diagonal
mask over the whole row: correct, but it computes and then discards every cross-example score, and
a masked SDPA cannot use the fused causal kernel. `packed_sdpa` is registered with transformers'
AttentionInterface: for a single packed row it runs causal SDPA once per example (the varlen idea
of flash-attention, with the kernels torch has everywhere); any other call (padded batches,
generation with a KV cache) goes to the stock sdpa function unchanged, and so does a packed row
whose layer has a sliding window shorter than one of its examples, soft-capping or another option
this kernel does not implement (`per_example_is_exact`): there transformers' own sdpa call with the
block-diagonal, windowed mask it built from the position restarts is the exact path.

Used: CPU training with `train.packing` or `train.precision: bf16` (on GPUs the masked kernel
measured faster). On a CPU, attention that will be backpropagated runs in float32 even when the
model runs in bf16 (`_needs_float32`), saving bf16 inputs and recomputing the float32 forward in
the backward (`_float32_recomputed`). Relies on
transformers' `AttentionInterface` / `AttentionMaskInterface` registration,
`transformers.integrations.sdpa_attention.sdpa_attention_forward` and `masking_utils.sdpa_mask`
(module paths that are not a stable API). Tested with transformers 5.24.0, torch 2.13.0.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

from medlora import patches

NAME = "medlora_packed_sdpa"


def packed_sdpa_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _needs_float32(query, key, value):

        def attend(q: Any, k: Any, v: Any) -> Any:
            with torch.autocast("cpu", enabled=False):
                output, _ = packed_sdpa_forward(
                    module, q, k, v, attention_mask, dropout=dropout, scaling=scaling, **kwargs
                )
            return output

        if dropout and module.training:  # a recomputed forward would draw another mask
            return attend(query.float(), key.float(), value.float()).to(query.dtype), None
        return _float32_recomputed().apply(query, key, value, attend), None
    position_ids = kwargs.get("position_ids")
    single_row = query.shape[0] == 1 and query.shape[2] == key.shape[2]
    if position_ids is None or not single_row or kwargs.get("past_key_values") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0 or len(starts) == 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    ends = [*starts[1:], query.shape[2]]
    lengths = [end - begin for begin, end in zip(starts, ends, strict=True)]
    if not per_example_is_exact(kwargs, max(lengths)):
        # transformers built this layer's block-diagonal mask with the window (masking_utils'
        # packed-sequence detection): its sdpa call is exact, only slower.
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    dropout_p = dropout if module.training else 0.0
    runs = [(length, len(list(run))) for length, run in itertools.groupby(lengths)]
    if len(runs) < len(lengths):
        return _attend_runs(query, key, value, runs, dropout_p, scaling), None
    if query.shape[1] != key.shape[1]:
        # Grouped-query attention: expand the key/value heads once for the whole row, not per
        # example inside the kernel (measured faster, forward plus backward, on CPU).
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    # `split`, not slicing: the backward of a slice allocates a zeroed row-sized gradient per
    # example; split's backward is one concatenation.
    parts = [
        F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scaling)
        for q, k, v in zip(
            query.split(lengths, dim=2),
            key.split(lengths, dim=2),
            value.split(lengths, dim=2),
            strict=True,
        )
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


# Keyword arguments the model families of medlora.families pass to an attention function that do
# not change what one example's causal attention computes (transformers 5.24-5.25).
NEUTRAL_KWARGS = frozenset({"position_ids", "use_cache", "cache_position", "past_key_values"})


def per_example_is_exact(kwargs: dict[str, Any], longest: int) -> bool:
    """Whether plain causal attention per example computes what this layer asks for.

    A sliding window at least as long as the longest example masks nothing inside it; a shorter
    one (Mistral, Gemma 2/3 local layers, examples past the window), logit soft-capping or any
    option this kernel does not know is left to transformers' masked path.
    """
    for name, value in kwargs.items():
        if name == "sliding_window":
            if value is not None and longest > value:
                return False
        elif name not in NEUTRAL_KWARGS and value is not None and value is not False:
            return False
    return True


def _needs_float32(query: Any, key: Any, value: Any) -> bool:
    """bf16 attention on a CPU, with a backward pass to come: run it in float32 instead.

    torch 2.13's CPU flash-attention backward in bf16 keeps memory for every sequence length it
    meets (freed memory is not the cause: malloc_trim does not return it; it looks like a
    per-shape kernel cache), and it ran slower than float32 (docs/benchmarks.md,
    "memory-breakdown-bf16"). Packed rows bring a new length with nearly every example, so a bf16
    run's RSS climbed step after step past `train.max_memory_gb` (tests/test_packed_attention.py
    checks it stays flat). Forward-only calls (evaluation, generation) grow far less and stay in
    bf16.
    """
    import torch

    return (
        query.dtype == torch.bfloat16
        and query.device.type == "cpu"
        and torch.is_grad_enabled()
        and (query.requires_grad or key.requires_grad or value.requires_grad)
    )


@functools.cache  # built on first use: importing this module does not import torch
def _float32_recomputed() -> Any:
    import torch

    class _Float32Recomputed(torch.autograd.Function):
        """`attend(q, k, v)` in float32 for bf16 inputs, saving the bf16 inputs only.

        Autograd through a float32 SDPA keeps float32 copies of q, k, v plus the float32 output
        (once the largest item of a bf16 step's saved activations). This keeps the bf16 q, k, v
        only and runs the float32 forward again inside the backward: exact (no dropout), for one
        more attention forward (docs/benchmarks.md, "memory-breakdown-bf16").
        """

        @staticmethod
        def forward(ctx: Any, query: Any, key: Any, value: Any, attend: Any) -> Any:
            ctx.save_for_backward(query, key, value)
            ctx.attend = attend
            return attend(query.float(), key.float(), value.float()).to(query.dtype)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, ...]:
            saved = ctx.saved_tensors
            wanted = ctx.needs_input_grad[:3]
            with torch.enable_grad():
                wide = [
                    t.detach().float().requires_grad_(need)
                    for t, need in zip(saved, wanted, strict=True)
                ]
                output = ctx.attend(*wide)
                inputs = [t for t, need in zip(wide, wanted, strict=True) if need]
                grads = iter(torch.autograd.grad(output, inputs, grad.float()))
            return (
                *(
                    next(grads).to(t.dtype) if need else None
                    for t, need in zip(saved, wanted, strict=True)
                ),
                None,
            )

    return _Float32Recomputed


def _attend_runs(
    query: Any,
    key: Any,
    value: Any,
    runs: list[tuple[int, int]],
    dropout_p: float,
    scaling: float | None,
) -> Any:
    """Consecutive examples of equal length (often: answers cut at `max_seq_len`) as one batch.

    A run of b examples of n tokens is a (b, heads, n, d) view of the row, so it takes a single
    causal SDPA call with the key/value heads shared in the kernel (`enable_gqa`); the outputs are
    concatenated straight into the (1, T, heads, d) layout the output projection reads. On a CPU
    it is faster than the per-example loop where a run exists; rows without one stay on the loop,
    which is faster there (docs/benchmarks.md, "engine-step").
    """
    import torch
    import torch.nn.functional as F

    sizes = [length * count for length, count in runs]
    outputs = []
    for (length, count), q, k, v in zip(
        runs,
        query.split(sizes, dim=2),
        key.split(sizes, dim=2),
        value.split(sizes, dim=2),
        strict=True,
    ):

        def batch(t: Any, length: int = length, count: int = count) -> Any:
            return t[0].unflatten(1, (count, length)).transpose(0, 1)

        out = F.scaled_dot_product_attention(
            batch(q),
            batch(k),
            batch(v),
            is_causal=True,
            dropout_p=dropout_p,
            scale=scaling,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        # (b, heads, n, d) -> (1, b * n, heads, d)
        outputs.append(out.transpose(1, 2).reshape(1, length * count, out.shape[1], out.shape[3]))
    return torch.cat(outputs, dim=1)


def use_packed_attention(model: Any) -> bool:
    """Switch a model that runs stock sdpa to `packed_sdpa`; leave flash-attention alone."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False  # flash-attention handles packed rows natively; eager stays eager
    if not patches.allowed("packed_attention"):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
