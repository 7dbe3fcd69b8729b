"""The gated MLP's `silu(gate) * up` saving only its two inputs, for CPU training.

Llama-style MLPs compute `down(silu(gate(x)) * up(x))`. Autograd through the stock modules keeps
three (tokens x intermediate) tensors per layer for the backward: silu's input (gate), and both
factors of the product (silu(gate) and up). `SiluMul` keeps gate and up only and recomputes
silu(gate) in the backward, one extra elementwise pass per layer: one (tokens x intermediate)
tensor less per layer (docs/benchmarks.md, "memory-breakdown-bf16"). liger-kernel's SwiGLU
does the same on CUDA with Triton; it does not run on a CPU, hence this file.

Used: CPU training, SFT and preference (train/loop.py and train/preference.py `build_model`).
`use_silu_mul` switches MLP modules whose class is in `STOCK_NAMES` and whose activation is SiLU,
in place (a subclass; weights and state dict unchanged). Relies on those classes' `gate_proj`,
`up_proj`, `down_proj` and `act_fn` attributes and on `torch.ops.aten.silu_backward` (a public
aten op, not a torch.nn.functional API). Tested with transformers 5.24.0, torch 2.13.0.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from medlora import patches
from medlora.train.kernels.class_swap import same_as_stock, swap_forward

# MLPs whose forward is exactly `down_proj(act_fn(gate_proj(x)) * up_proj(x))`.
STOCK_NAMES = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
SILU_NAMES = {"SiLUActivation", "SiLU"}


class SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving gate and up (not silu(gate)) for the backward."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = F.silu(gate).mul_(grad)
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad_up


def _silu_mul_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return self.down_proj(SiluMul.apply(gate, up))
    return self.down_proj(self.act_fn(gate) * up)


def _is_stock_silu_mlp(module: Any) -> bool:
    return (
        type(module).__name__ in STOCK_NAMES
        and type(getattr(module, "act_fn", None)).__name__ in SILU_NAMES
        and all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj"))
        and same_as_stock(module, _silu_mul_forward, (module.gate_proj.in_features,))
    )


def use_silu_mul(model: Any) -> int:
    """Switch the model's stock SiLU-gated MLPs to `SiluMul`; returns how many switched."""
    if not patches.allowed("silu_mul"):
        return 0
    return swap_forward(model, "SiluMul", _silu_mul_forward, _is_stock_silu_mlp)
