"""LoRA dropout with a cheaper random mask and no dropped copy kept, for CPU training.

PEFT applies `nn.Dropout` to every LoRA input, and on CPU torch draws each Bernoulli element from
its own call into the generator: at rank 4 that mask costs more than the LoRA matmuls it feeds
(docs/benchmarks.md, `peer`). One 64-bit draw holds four 15-bit uniform integers, so
`FastDropout` draws a quarter as many words and keeps an element when its integer is at or above
round(p * 32768): the same independent Bernoulli mask with p rounded to a multiple of 1/32768,
and the kept values scaled by the exact inverse keep rate, so the expectation is unchanged.
It draws from torch's default generator, so seeding and checkpoint RNG state cover it.

Memory: PEFT computes `lora_A(dropout(x))`, so each LoRA layer keeps its own dropped copy of its
input for A's gradient: q, k and v three copies of the same hidden states, gate and up two. With
all linear layers adapted that was half of what a demo step keeps (docs/benchmarks.md,
`memory-breakdown-fp32`). Where the LoRA layer is a plain `nn.Linear` A, the dropout moves into A
(`_DroppedLinear`): it keeps its input itself (one tensor, shared by every projection of it) and
the one-byte mask, and forms the dropped input again in the backward. The masks are drawn at the
same point of the forward as before, so a seeded run trains exactly as it did.

Used: CPU training only (train/loop.py `build_model`, when CUDA is absent); not in preference
tuning (TRL switches dropout off). Relies on PEFT's internals: each LoRA layer keeps its dropouts in
a `lora_dropout` ModuleDict and its A layers in a `lora_A` ModuleDict keyed by adapter name, and
calls `lora_B(lora_A(dropout(x)))` (DoRA adapters, in `lora_variant`, keep PEFT's order).
Tested with peft 0.21.2, torch 2.13.0.
"""

from __future__ import annotations

from typing import Any

import torch

from medlora import patches
from medlora.train.kernels.class_swap import swap_forward

LEVELS = 1 << 15  # int64.random_() fills 63 bits: each 16-bit quarter has 15 uniform low bits


class FastDropout(torch.nn.Module):
    """Inverted dropout whose mask comes from 15-bit integers (see the module docstring)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(p * LEVELS)
        self.scale = LEVELS / (LEVELS - self.threshold)

    def keep_mask(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        count = shape.numel()
        words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_()
        draws = words.view(torch.int16)[:count].view(shape) & (LEVELS - 1)
        return draws >= self.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        return _KeepAndScale.apply(x, self.keep_mask(x.shape, x.device), self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _KeepAndScale(torch.autograd.Function):
    """x * keep * scale, saving the boolean mask (1 byte per element, not a float32 one)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


class _DroppedLinear(torch.autograd.Function):
    """(x * keep * scale) @ weight.T, keeping x itself and the one-byte mask, not the dropped
    copy. (Keeping a seed instead of the mask and drawing it again in the backward saved another
    byte per element, but the demo's training steps took longer: docs/benchmarks.md,
    `memory-breakdown-fp32`.)"""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, dropout: FastDropout) -> Any:
        keep = dropout.keep_mask(x.shape, x.device)
        ctx.save_for_backward(x, weight, keep)
        ctx.scale = dropout.scale
        return torch.nn.functional.linear(x.mul(keep).mul_(dropout.scale), weight)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, Any, None]:
        x, weight, keep = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(grad.dtype)).mul_(keep).mul_(ctx.scale).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dropped = x.mul(keep).mul_(ctx.scale).to(grad.dtype)
            rows = grad.reshape(-1, grad.shape[-1]).t() @ dropped.reshape(-1, x.shape[-1])
            grad_weight = rows.to(weight.dtype)
        return grad_x, grad_weight, None


def _dropped_linear_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """Forward of a LoRA A layer that applies its own dropout (`self.dropout`) while training."""
    dropout: FastDropout = self.dropout
    if not (self.training and dropout.threshold) or not torch.is_grad_enabled():
        return torch.nn.functional.linear(dropout(x), self.weight)
    return _DroppedLinear.apply(x, self.weight, dropout)


def use_fast_lora_dropout(model: Any) -> int:
    """Swap PEFT's `nn.Dropout` LoRA dropouts for `FastDropout`, moved into the LoRA A layer where
    that is a plain bias-free `nn.Linear` of a vanilla LoRA (see the module docstring); returns
    how many were swapped."""
    if not patches.allowed("lora_dropout"):
        return 0
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        a_layers = getattr(module, "lora_A", None)
        variants = getattr(module, "lora_variant", {})
        for name, dropout in dropouts.items():
            if not (isinstance(dropout, torch.nn.Dropout) and dropout.p > 0):
                continue
            swapped += 1
            a_layer = a_layers[name] if isinstance(a_layers, torch.nn.ModuleDict) else None
            if type(a_layer) is not torch.nn.Linear or a_layer.bias is not None or name in variants:
                dropouts[name] = FastDropout(dropout.p)
                continue
            a_layer.dropout = FastDropout(dropout.p)  # no parameters: the state dict is unchanged
            swap_forward(a_layer, "Dropped", _dropped_linear_forward, lambda m, a=a_layer: m is a)
            dropouts[name] = torch.nn.Identity()
    return swapped
