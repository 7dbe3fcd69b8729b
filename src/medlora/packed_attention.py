"""Attention for packed rows without the quadratic mask: each example attends to itself only.

transformers' sdpa path handles a packed row (position_ids restarting at 0) with a block-diagonal
mask over the whole row: correct, but it computes and then discards every cross-example score, and
a masked SDPA cannot use the fused causal kernel. `packed_sdpa` is registered with transformers'
AttentionInterface: for a single packed row it runs causal SDPA once per example (the varlen idea
of flash-attention, with the kernels torch has everywhere); any other call (padded batches,
generation with a KV cache) goes to the stock sdpa function unchanged.
"""

from __future__ import annotations

from typing import Any

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
    if query.shape[1] != key.shape[1]:
        # Grouped-query attention: expand the key/value heads once for the whole row, not per
        # example inside the kernel (measured faster, forward plus backward, on CPU).
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    # `split`, not slicing: the backward of a slice allocates a zeroed row-sized gradient per
    # example; split's backward is one concatenation.
    parts = [
        F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            dropout_p=dropout if module.training else 0.0,
            scale=scaling,
        )
        for q, k, v in zip(
            query.split(lengths, dim=2),
            key.split(lengths, dim=2),
            value.split(lengths, dim=2),
            strict=True,
        )
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def use_packed_attention(model: Any) -> bool:
    """Switch a model that runs stock sdpa to `packed_sdpa`; leave flash-attention alone."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False  # flash-attention handles packed rows natively; eager stays eager
    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
