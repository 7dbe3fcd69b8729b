"""RMSNorm with a frozen weight in three passes over the activations, for CPU training.

Llama-style RMSNorm (`weight * x / sqrt(mean(x²) + eps)`) runs in transformers as six separate
elementwise operations, and autograd's backward through them as about a dozen more, each one a
full pass over a (tokens x hidden) tensor. With LoRA the norm weights are frozen, so the backward
needs only the input gradient, which has a closed form:

    x̂ = x·r,  r = 1/sqrt(mean(x²) + eps),  y = w·x̂
    dx = r·(w·dy) - x · r³ · mean(w·dy·x)

`FrozenRMSNorm` computes the forward in three passes and that gradient in four: faster than the
stock norm on a CPU, and so the training step (docs/benchmarks.md, "engine-step").
`use_fast_rms_norm` switches a model's norms to it in place: the module keeps its class (a
subclass), weight and state dict. Norms with a trainable weight take the stock forward. bf16 inputs
(CPU bf16 training) are normalized in float32 like the stock norm's, and saved in bf16 (see
`FrozenRMSNorm`).

Used: CPU training, SFT and preference (train/loop.py and train/preference.py `build_model`).
Relies on transformers' RMSNorm modules by class name (`STOCK_NAMES`) and their `weight` /
`variance_epsilon` attributes; the class is swapped in place, so the state dict is unchanged.
Tested with transformers 5.24.0 (Llama, Mistral, Qwen2, Qwen3, Phi-3 norms), torch 2.13.0.
"""

from __future__ import annotations

from typing import Any

import torch

from medlora import patches
from medlora.train.kernels.class_swap import same_as_stock, swap_forward

# Norm classes whose forward is exactly `weight * (x * rsqrt(mean(x²) + variance_epsilon))`
# computed in float32 (Gemma's `1 + weight` norm is not one of them).
STOCK_NAMES = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"}


class FrozenRMSNorm(torch.autograd.Function):
    """y = weight * x * rsqrt(mean(x²) + eps), gradient for x only (the weight is frozen).

    A bf16 (or fp16) input is normalized in float32 and rounded back before the weight, as the
    stock norm does, but saved for the backward in its own dtype: the stock norm's autograd keeps
    a float32 copy of every norm input; this keeps half of that (docs/benchmarks.md,
    "memory-breakdown-bf16").
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        wide = _widened(x)
        inverse_rms = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, inverse_rms)
        if wide is x:
            return torch.mul(x, inverse_rms).mul_(weight)
        return weight * wide.mul_(inverse_rms).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        x, weight, inverse_rms = ctx.saved_tensors
        wide = _widened(x)
        weighted = (grad * weight).to(wide.dtype)
        # x · r³ · mean(w·dy·x), as one multiply-add onto r·(w·dy).
        coefficient = torch.linalg.vecdot(weighted, wide).unsqueeze(-1)
        coefficient.mul_(inverse_rms.pow(3)).div_(-x.shape[-1])
        return torch.addcmul(weighted.mul_(inverse_rms), wide, coefficient).to(x.dtype), None, None


def _widened(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision inputs (the stock norm's compute dtype); others as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _fast_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    if self.weight.requires_grad or not hidden_states.is_floating_point():
        return super(type(self), self).forward(hidden_states)
    if not torch.is_grad_enabled() or not hidden_states.requires_grad:
        return super(type(self), self).forward(hidden_states)
    return FrozenRMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _is_stock_norm(module: Any) -> bool:
    return (
        type(module).__name__ in STOCK_NAMES
        and isinstance(getattr(module, "variance_epsilon", None), float)
        and same_as_stock(module, _fast_forward, (module.weight.shape[-1],))
    )


def use_fast_rms_norm(model: Any) -> int:
    """Switch the model's stock RMSNorm modules to `FrozenRMSNorm`; returns how many switched."""
    if not patches.allowed("rms_norm"):
        return 0
    return swap_forward(model, "Fast", _fast_forward, _is_stock_norm)
