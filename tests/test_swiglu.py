"""SiluMul: the gated MLP's silu(gate) * up with the stock output and gradients, saving two wide
tensors for the backward instead of three, switched in place into the CPU training model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medlora.config import recipe_from_dict
from medlora.train.kernels.swiglu import SiluMul, use_silu_mul


def _saved_bytes(fn: object) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of `fn()`."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()  # type: ignore[operator]
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_and_gradients_equal_the_stock_product(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    gate = (torch.randn(2, 9, 40) * 3).to(dtype).requires_grad_()
    up = torch.randn(2, 9, 40).to(dtype).requires_grad_()
    grad = torch.randn(2, 9, 40).to(dtype)
    expected = F.silu(gate) * up
    expected_grads = torch.autograd.grad(expected, (gate, up), grad)
    out = SiluMul.apply(gate, up)
    grads = torch.autograd.grad(out, (gate, up), grad)
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(out, expected, **tolerance)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, **tolerance)
    g64 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    u64 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiluMul.apply, (g64, u64))


def test_the_backward_keeps_two_wide_tensors_where_the_stock_keeps_three() -> None:
    gate = torch.randn(64, 1536, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(64, 1536, dtype=torch.bfloat16, requires_grad=True)
    wide = gate.numel() * gate.element_size()
    assert _saved_bytes(lambda: F.silu(gate) * up) == 3 * wide
    assert _saved_bytes(lambda: SiluMul.apply(gate, up)) == 2 * wide


def test_cpu_training_model_uses_it_in_every_mlp_and_learns_the_same(tiny_model_dir: Path) -> None:
    from medlora.train.loop import build_model

    recipe = recipe_from_dict(
        {
            "model": {"name": str(tiny_model_dir)},
            "lora": {"r": 2, "dropout": 0.0, "target_modules": "all-linear"},
        }
    )
    built, tokenizer = build_model(recipe, None)
    mlps = [m for m in built.modules() if type(m).__name__.endswith("LlamaMLP")]
    assert len(mlps) == 2 and all(type(m).__name__ == "SiluMulLlamaMLP" for m in mlps)
    torch.manual_seed(0)
    for name, param in built.named_parameters():
        if "lora_B" in name:  # non-zero B, so every LoRA weight gets a gradient
            param.data.normal_(0, 0.1)
    ids = torch.tensor([tokenizer("What causes gout? Uric acid crystals in a joint.").input_ids])

    def lora_grads() -> dict[str, torch.Tensor]:
        built.zero_grad()
        built(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in built.named_parameters() if p.grad is not None}

    fused = lora_grads()
    for mlp in mlps:  # back to the stock class: the same weights, the stock forward
        mlp.__class__ = type(mlp).__mro__[1]
    stock = lora_grads()
    assert fused.keys() == stock.keys() and any("mlp" in name for name in fused)
    for name, grad in stock.items():
        torch.testing.assert_close(fused[name], grad, rtol=1e-5, atol=1e-7)
    assert use_silu_mul(torch.nn.ModuleList([torch.nn.Linear(2, 2)])) == 0
