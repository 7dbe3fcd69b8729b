"""`train.kernels: liger`: one clear line where it cannot run (CPU, not installed, other family),
liger's public patch called with medlora's loss patches off, and the answer loss computed by
liger's fused linear cross-entropy called with its argument order (weight, input, target).

No GPU and no Triton here: a stand-in `liger_kernel.transformers` records the calls and computes
the cross-entropy the way liger documents it. The real kernels run in bench/gpu_check.sh."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import lora_on_q_v, tiny_records

from medlora.config import recipe_from_dict
from medlora.data.format import format_records
from medlora.data.pack import collate_packed, pack_rows
from medlora.errors import ConfigError
from medlora.models import load_model
from medlora.train.kernels.answer_head import answer_loss_sum
from medlora.train.kernels.liger import use_liger_kernels


@pytest.fixture
def fake_liger(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """liger_kernel.transformers with `apply_liger_kernel_to_llama` and the fused loss module."""
    calls: list[dict[str, Any]] = []

    class LigerFusedLinearCrossEntropyLoss(torch.nn.Module):
        def __init__(self, ignore_index: int = -100, reduction: str = "mean") -> None:
            super().__init__()
            self.ignore_index, self.reduction = ignore_index, reduction

        def forward(self, lin_weight: Any, _input: Any, target: Any, bias: Any = None) -> Any:
            calls.append({"loss": (tuple(lin_weight.shape), tuple(_input.shape))})
            logits = (_input @ lin_weight.t()).float()
            return torch.nn.functional.cross_entropy(
                logits, target, ignore_index=self.ignore_index, reduction=self.reduction
            )

    package = types.ModuleType("liger_kernel")
    module = types.ModuleType("liger_kernel.transformers")
    module.apply_liger_kernel_to_llama = lambda **kwargs: calls.append(kwargs)  # type: ignore[attr-defined]
    module.LigerFusedLinearCrossEntropyLoss = LigerFusedLinearCrossEntropyLoss  # type: ignore[attr-defined]
    package.transformers = module  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", module)
    from medlora.train.kernels import liger

    liger._liger_loss.cache_clear()
    yield calls
    liger._liger_loss.cache_clear()


def test_a_cpu_run_stops_with_one_line_and_writes_nothing(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from medlora.train import train

    recipe = recipe_from_dict({"model": {"name": str(tiny_model_dir)}}, ["train.kernels=liger"])
    with pytest.raises(ConfigError, match=r"train.kernels: liger .*CUDA.*train.kernels: medlora"):
        train(recipe, tmp_path / "run")
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_missing_package_and_other_families_are_named(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, fake_liger: list[dict[str, Any]]
) -> None:
    model, _ = load_model(str(tiny_model_dir))
    model.config.model_type = "gemma2"
    with pytest.raises(ConfigError, match="model type 'gemma2'.*llama"):
        use_liger_kernels(model, "cuda")
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)  # import fails
    with pytest.raises(ConfigError, match="pip install liger-kernel"):
        use_liger_kernels(model, "cuda")


def test_liger_patches_norm_rope_swiglu_and_never_its_own_loss(
    tiny_model_dir: Path, fake_liger: list[dict[str, Any]]
) -> None:
    model, _ = load_model(str(tiny_model_dir))
    assert use_liger_kernels(model, "cuda") is model
    (call,) = fake_liger
    assert call["model"] is model
    assert call["rope"] and call["rms_norm"] and call["swiglu"]
    assert not call["cross_entropy"] and not call["fused_linear_cross_entropy"]


def test_liger_head_gives_medloras_loss_and_gradients(
    tiny_model_dir: Path, fake_liger: list[dict[str, Any]]
) -> None:
    """Same answer positions, same sum: only the kernel that multiplies the head changes."""
    model, tokenizer = load_model(str(tiny_model_dir))
    model = lora_on_q_v(model)
    model.train()
    examples, _ = format_records(tokenizer, tiny_records(2), None, 128)
    batch = collate_packed(pack_rows(examples, budget=4096))
    results = {}
    for kernels in ("medlora", "liger"):
        model.zero_grad()
        total, count, _ = answer_loss_sum(model, batch, kernels=kernels)
        total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[kernels] = (float(total.detach()), count, grads)
    assert [c for c in fake_liger if "loss" in c], "liger's loss module was not called"
    (medlora_loss, medlora_count, medlora_grads), (liger_loss, liger_count, liger_grads) = (
        results["medlora"],
        results["liger"],
    )
    assert liger_count == medlora_count > 0
    assert liger_loss == pytest.approx(medlora_loss, rel=1e-5)
    assert liger_grads.keys() == medlora_grads.keys() and liger_grads
    for name, grad in liger_grads.items():
        torch.testing.assert_close(grad, medlora_grads[name], rtol=1e-3, atol=5e-5)


def test_the_real_liger_kernel_accepts_the_call_and_patches_the_model(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opt-in (needs liger-kernel and Triton, no GPU): liger's own patch takes medlora's keywords
    and swaps the norms', the MLPs' and RoPE's code on a real model; nothing runs a kernel."""
    liger = pytest.importorskip(
        "liger_kernel.transformers", reason="opt-in: pip install liger-kernel"
    )
    from transformers.models.llama import modeling_llama

    # liger swaps RoPE in transformers' module for the whole process: restored after the test.
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)
    model, _ = load_model(str(tiny_model_dir))
    use_liger_kernels(model, "cuda")
    assert model.model.norm.forward.__func__ is liger.LigerRMSNorm.forward
    assert model.model.layers[0].mlp.forward.__func__ is liger.LigerSwiGLUMLP.forward
    assert modeling_llama.apply_rotary_pos_emb is liger.liger_rotary_pos_emb
