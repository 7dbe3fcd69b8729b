"""LoRA dropout with a cheaper random mask, for CPU training.

PEFT applies `nn.Dropout` to every LoRA input, and on CPU torch draws each Bernoulli element from
its own call into the generator: at rank 4 that mask costs more than the LoRA matmuls it feeds
(docs/benchmarks.md, `peer`). One 64-bit draw holds four 15-bit uniform integers, so
`FastDropout` draws a quarter as many words and keeps an element when its integer is at or above
round(p * 32768): the same independent Bernoulli mask with p rounded to a multiple of 1/32768,
and the kept values scaled by the exact inverse keep rate, so the expectation is unchanged.
It draws from torch's default generator, so seeding and checkpoint RNG state cover it.

Used: CPU training only (train/loop.py `build_model`, when CUDA is absent); not in preference
tuning (TRL switches dropout off). Relies on PEFT's internals: each LoRA layer keeps its dropouts in
a `lora_dropout` ModuleDict keyed by adapter name. Tested with peft 0.21.2, torch 2.13.0.
"""

from __future__ import annotations

from typing import Any

import torch

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


def use_fast_lora_dropout(model: Any) -> int:
    """Swap PEFT's `nn.Dropout` LoRA dropouts for `FastDropout`; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                dropouts[name] = FastDropout(dropout.p)
                swapped += 1
    return swapped
