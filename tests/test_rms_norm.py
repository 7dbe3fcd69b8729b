"""FrozenRMSNorm: the same output and input gradient as transformers' RMSNorm, switched in place
into the CPU training model (class, weights and state dict kept; trainable norms left on the stock
path); bf16 inputs are normalized in float32 and saved in bf16."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from medlora.config import recipe_from_dict
from medlora.train.kernels.rms_norm import use_fast_rms_norm


def _norm_pair(hidden: int = 48) -> tuple[LlamaRMSNorm, LlamaRMSNorm]:
    torch.manual_seed(0)
    stock = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        stock.weight.uniform_(0.5, 1.5)
    stock.weight.requires_grad_(False)
    fast = LlamaRMSNorm(hidden, eps=1e-5)
    fast.load_state_dict(stock.state_dict())
    fast.weight.requires_grad_(False)
    holder = torch.nn.ModuleList([fast])
    assert use_fast_rms_norm(holder) == 1
    return stock, fast


def test_output_and_input_gradient_equal_the_stock_norm() -> None:
    stock, fast = _norm_pair()
    assert isinstance(fast, LlamaRMSNorm) and type(fast) is not LlamaRMSNorm
    assert fast.state_dict().keys() == stock.state_dict().keys()
    x = (torch.randn(2, 7, 48) * 3 + 0.5).requires_grad_()
    grad = torch.randn(2, 7, 48)
    expected = stock(x)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    out = fast(x)
    assert out.grad_fn is not None and "FrozenRMSNorm" in type(out.grad_fn).__name__
    (got_grad,) = torch.autograd.grad(out, x, grad)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-6)
    # Second-order check of the closed form: finite differences in double precision.
    x64 = torch.randn(1, 3, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(6, dtype=torch.float64) + 0.5
    from medlora.train.kernels.rms_norm import FrozenRMSNorm

    assert torch.autograd.gradcheck(lambda t: FrozenRMSNorm.apply(t, weight, 1e-5), (x64,))


def test_bf16_input_matches_the_stock_norm_and_is_saved_in_bf16() -> None:
    stock, fast = _norm_pair()
    stock.to(torch.bfloat16)
    fast.to(torch.bfloat16)
    x = (torch.randn(2, 7, 48) * 3 + 0.5).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(2, 7, 48).to(torch.bfloat16)
    saved: list[torch.dtype] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.shape == x.shape:
            saved.append(tensor.dtype)
        return tensor

    expected = stock(x)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fast(x)
    assert "FrozenRMSNorm" in type(out.grad_fn).__name__
    assert saved == [torch.bfloat16]  # the stock norm keeps a float32 copy of the input
    (got_grad,) = torch.autograd.grad(out, x, grad)
    assert out.dtype == got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(got_grad, expected_grad)


def test_trainable_weight_bfloat16_and_no_grad_take_the_stock_path() -> None:
    stock, fast = _norm_pair()
    x = torch.randn(3, 48, requires_grad=True)
    fast.weight.requires_grad_(True)
    out = fast(x)
    assert "FrozenRMSNorm" not in type(out.grad_fn).__name__
    out.sum().backward()
    assert fast.weight.grad is not None  # a trainable norm still learns
    fast.weight.requires_grad_(False)
    half = x.detach().to(torch.bfloat16)
    torch.testing.assert_close(fast(half), stock(half))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), stock(x))


def test_cpu_training_model_uses_it_in_every_norm(tiny_model_dir: Path) -> None:
    from medlora.train.loop import build_model

    recipe = recipe_from_dict({"model": {"name": str(tiny_model_dir)}, "lora": {"r": 2}})
    built, _ = build_model(recipe, None)
    norms = [m for m in built.modules() if isinstance(m, LlamaRMSNorm)]
    assert len(norms) == 2 * 2 + 1  # 2 layers x (input, post-attention) + the final norm
    assert all(type(m).__name__ == "FastLlamaRMSNorm" for m in norms)
