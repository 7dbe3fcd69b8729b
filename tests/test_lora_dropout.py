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
