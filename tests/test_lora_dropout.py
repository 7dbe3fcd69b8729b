"""FastDropout: the same Bernoulli dropout as nn.Dropout (rate, expectation, gradient, seeding),
swapped into PEFT's LoRA layers by the CPU training engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medlora.config import recipe_from_dict
from medlora.train.kernels.lora_dropout import FastDropout, use_fast_lora_dropout


def test_drops_at_the_requested_rate_and_keeps_the_expectation() -> None:
    torch.manual_seed(0)
    dropout = FastDropout(0.05).train()
    out = dropout(torch.ones(1_000_000))
    dropped = float((out == 0).float().mean())
    # 1e6 draws: the standard error of the rate is 2.2e-4.
    assert dropped == pytest.approx(0.05, abs=1.5e-3)
    assert float(out.mean()) == pytest.approx(1.0, abs=3e-3)
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.95), rtol=1e-4)


def test_masks_are_independent_across_elements_and_calls() -> None:
    torch.manual_seed(0)
    dropout = FastDropout(0.5).train()
    first = dropout(torch.ones(4096, 64)) == 0
    second = dropout(torch.ones(4096, 64)) == 0
    assert not torch.equal(first, second)
    # Neighbouring elements share a 64-bit draw: their masks must still be uncorrelated.
    both = (first[:, 0::4] & first[:, 1::4]).float().mean()
    assert float(both) == pytest.approx(0.25, abs=0.01)
    assert float((first & second).float().mean()) == pytest.approx(0.25, abs=0.01)


def test_seeded_masks_repeat_eval_mode_is_identity_and_gradients_follow_the_mask() -> None:
    dropout = FastDropout(0.3).train()
    x = torch.randn(300, 7, requires_grad=True)
    torch.manual_seed(1)
    out = dropout(x)
    torch.manual_seed(1)
    assert torch.equal(dropout(x), out)
    out.sum().backward()
    expected = (out != 0).float() / (1 - dropout.threshold / 2**15)
    torch.testing.assert_close(x.grad, expected)
    assert dropout.eval()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        FastDropout(1.0)


def test_training_on_cpu_uses_it_in_every_lora_layer(tiny_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from medlora.models import load_model
    from medlora.train.loop import build_model

    model, _ = load_model(str(tiny_model_dir))
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    )
    assert use_fast_lora_dropout(peft_model) == 2 * 2  # 2 layers x q/v
    recipe = recipe_from_dict(
        {"model": {"name": str(tiny_model_dir)}, "lora": {"r": 2, "dropout": 0.1}}
    )
    built, _ = build_model(recipe, None)
    dropouts = [m for m in built.modules() if isinstance(m, (FastDropout, torch.nn.Dropout))]
    assert dropouts and all(isinstance(m, FastDropout) for m in dropouts)


def test_backward_holds_only_a_one_byte_mask() -> None:
    saved: list[torch.dtype] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.dtype)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        FastDropout(0.1).train()(torch.randn(64, 8, requires_grad=True))
    assert saved == [torch.bool]  # not a float32 copy of the mask (4x the activation memory)


# --- the dropout inside LoRA's A layer ----------------------------------------------------------


def _dropped_a_layer(p: float) -> torch.nn.Linear:
    from medlora.train.kernels.class_swap import swap_forward
    from medlora.train.kernels.lora_dropout import _dropped_linear_forward

    layer = torch.nn.Linear(16, 4, bias=False)
    layer.dropout = FastDropout(p)
    swap_forward(layer, "Dropped", _dropped_linear_forward, lambda m: m is layer)
    return layer


def test_a_layer_with_its_dropout_equals_dropout_then_linear_and_keeps_no_copy() -> None:
    torch.manual_seed(0)
    layer = _dropped_a_layer(0.3)
    x = torch.randn(2, 50, 16, requires_grad=True)
    saved: list[tuple[torch.dtype, int]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append((tensor.dtype, tensor.data_ptr()))
        return tensor

    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(x)
    # Kept for the backward: the input itself, the weight and a one-byte mask; no dropped copy.
    floats = sorted(ptr for dtype, ptr in saved if dtype == torch.float32)
    assert floats == sorted([x.data_ptr(), layer.weight.data_ptr()])
    assert [dtype for dtype, _ in saved if dtype != torch.float32] == [torch.bool]
    (out * torch.arange(4)).sum().backward()

    # PEFT's order by hand, from the same generator state: the same mask, output and gradients.
    torch.manual_seed(3)
    dropout = FastDropout(0.3).train()
    x_ref = x.detach().clone().requires_grad_()
    w_ref = layer.weight.detach().clone().requires_grad_()
    ref = torch.nn.functional.linear(dropout(x_ref), w_ref)
    (ref * torch.arange(4)).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad)
    assert 0.25 < float((x_ref.grad == 0).float().mean()) < 0.35  # dropped: no gradient
    assert torch.equal(layer.eval()(x), torch.nn.functional.linear(x, layer.weight))


def test_a_layer_with_its_dropout_repeats_its_mask_under_activation_checkpointing() -> None:
    from torch.utils.checkpoint import checkpoint

    layer = _dropped_a_layer(0.5)
    x = torch.randn(64, 16, requires_grad=True)
    grads = []
    for checkpointed in (False, True):
        x.grad, layer.weight.grad = None, None
        torch.manual_seed(7)
        out = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        out.square().sum().backward()
        grads.append((x.grad.clone(), layer.weight.grad.clone()))
    # The recomputed forward draws the same mask (checkpoint restores the RNG state).
    torch.testing.assert_close(grads[0], grads[1])


def _saved_bytes(model: torch.nn.Module, tokens: int) -> int:
    """Bytes of the distinct activations (not parameters) one training forward keeps."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not (tensor.requires_grad and tensor.is_leaf):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=torch.randint(1, 100, (1, tokens)), use_cache=False)
    return sum(storages.values())


def test_peft_layers_get_the_dropout_in_a_and_save_the_same_adapter(tiny_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from medlora.models import load_model

    def lora_model() -> torch.nn.Module:
        model, _ = load_model(str(tiny_model_dir))
        config = LoraConfig(r=2, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj"])
        return get_peft_model(model, config)

    before = lora_model()  # the dropout in front of A, each projection its own dropped copy
    for module in before.modules():
        if isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict):
            module.lora_dropout["default"] = FastDropout(0.1)
    peft_model = lora_model()
    keys = list(peft_model.state_dict())
    assert use_fast_lora_dropout(peft_model) == 2 * 3
    assert list(peft_model.state_dict()) == keys  # the saved adapter's names and tensors
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.lora_dropout["default"], torch.nn.Identity)
    assert isinstance(layer.lora_A["default"].dropout, FastDropout)
    # q, k and v keep their one shared input, not three dropped copies (float32).
    layers = len(peft_model.base_model.model.model.layers)
    copy = 24 * peft_model.config.hidden_size * 4
    assert _saved_bytes(before, 24) - _saved_bytes(peft_model, 24) >= 1.5 * layers * copy
