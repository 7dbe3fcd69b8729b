"""The patch layer (medlora.patches): a patch outside its tested library versions, or whose
precondition fails, is skipped with one warning line and the stock code runs (same losses);
`medlora env` reports every patch, and a run keeps the facts in env.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import tiny_records, write_prepared
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from medlora import patches
from medlora.config import recipe_from_dict
from medlora.data.format import format_records
from medlora.data.pack import collate_packed, pack_rows
from medlora.models import load_model
from medlora.train.kernels import class_swap
from medlora.train.kernels.answer_head import answer_loss_sum
from medlora.train.loop import build_model

LORA = ["lora.r=4", "lora.dropout=0.1", "lora.target_modules=all-linear", "train.packing=true"]


@pytest.fixture(autouse=True)
def _fresh_warnings() -> None:
    patches._warn_once.cache_clear()
    class_swap._CHECKED.clear()


def _untested(library: str) -> str | None:
    return {"transformers": "5.99.0", "peft": "0.99.0", "torch": "2.99.0"}.get(library, "1.0")


def _first_step(model: object, tokenizer: object, kernels: str) -> tuple[float, dict]:
    examples, _ = format_records(tokenizer, tiny_records(1), None, 128)
    batch = collate_packed(pack_rows(examples, budget=4096))
    torch.manual_seed(0)
    loss, count, _ = answer_loss_sum(model, batch, kernels=kernels)
    (loss / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def test_patches_outside_their_tested_versions_are_skipped_and_training_is_stock(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spec = str(tiny_model_dir)
    stock_recipe = recipe_from_dict({"model": {"name": spec}}, [*LORA, "train.kernels=stock"])
    torch.manual_seed(0)  # the same LoRA A initialisation for both models
    stock, tokenizer = build_model(stock_recipe, load_model(spec))
    assert stock.medlora_kernels == []
    stock.eval()  # dropout off, so the two models compute one function
    stock_loss, stock_grads = _first_step(stock, tokenizer, "stock")

    monkeypatch.setattr(patches, "installed_version", _untested)
    with caplog.at_level(logging.WARNING, logger="medlora.patches"):
        recipe = recipe_from_dict({"model": {"name": spec}}, LORA)  # train.kernels: medlora
        torch.manual_seed(0)
        model, _ = build_model(recipe, load_model(spec))
    assert model.medlora_kernels == []  # nothing swapped, registered or rewritten
    assert model.config._attn_implementation == "sdpa"
    swapped = ("Fast", "SiluMul")
    assert not any(type(m).__name__.startswith(swapped) for m in model.modules())
    assert sum(type(m) in (LlamaRMSNorm, LlamaMLP) for m in model.modules()) == 5 + 2
    dropouts = [d for n, d in model.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and all(type(d) is torch.nn.Dropout for d in dropouts)  # peft's own
    skipped = {r.getMessage().split("'")[1] for r in caplog.records}
    assert skipped == {
        "packed_attention",
        "rms_norm",
        "silu_mul",
        "fused_answer_head",
    }
    for record in caplog.records:  # one line each, naming the version and the fallback
        message = record.getMessage()
        assert "\n" not in message and "outside the tested range" in message and "using" in message
    model.eval()
    loss, grads = _first_step(model, tokenizer, "medlora")
    assert loss == pytest.approx(stock_loss, rel=1e-6)
    assert grads.keys() == stock_grads.keys()
    for name, grad in grads.items():  # float32 summation order differs: tolerance to scale
        scale = float(stock_grads[name].abs().max())
        torch.testing.assert_close(grad, stock_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_a_same_named_class_that_computes_otherwise_is_not_swapped(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A transformers release where LlamaRMSNorm means something else keeps its stock forward.
    stock_forward = LlamaRMSNorm.forward
    monkeypatch.setattr(LlamaRMSNorm, "forward", lambda self, x: stock_forward(self, x) * 2)
    spec = str(tiny_model_dir)
    model, _ = build_model(recipe_from_dict({"model": {"name": spec}}, LORA), load_model(spec))
    assert not any(k.startswith("rms_norm") for k in model.medlora_kernels)
    assert any(k.startswith("silu_mul") for k in model.medlora_kernels)  # the MLP did not change
    assert all(type(m) is LlamaRMSNorm for m in model.modules() if isinstance(m, LlamaRMSNorm))


def test_every_patch_has_what_a_maintainer_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    for patch in patches.PATCHES.values():
        assert (
            patch.touches
            and patch.why
            and patch.fallback
            and patch.stage in ("train", "eval", "serve")
        )
        low, high = patch.tested
        assert patches._in_range(low, patch.tested) and not patches._in_range(high, patch.tested)
    monkeypatch.setattr(patches, "installed_version", lambda library: None)
    on, reason = patches.status("rms_norm")
    assert not on and reason == "transformers is not installed"


def test_env_command_and_run_env_json(tmp_path: Path, tiny_model_dir: Path) -> None:
    from typer.testing import CliRunner

    from medlora.cli import app
    from medlora.train import train

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(f"model:\n  name: {tiny_model_dir}\ntrain:\n  packing: true\n")
    shown = CliRunner().invoke(app, ["env", str(recipe_file), "--json"])
    assert shown.exit_code == 0, shown.output
    facts = json.loads(shown.output)
    assert facts["libraries"]["transformers"] and {p["name"] for p in facts["patches"]} == set(
        patches.PATCHES
    )
    assert facts["run"]["family"] == "Llama"
    assert facts["run"]["attention"].startswith("packed rows: medlora per-example causal SDPA")
    assert "rms_norm: on" in facts["run"]["patches"]

    records = tiny_records()
    prepared = write_prepared(tmp_path / "data", records[:8], records[8:10], records[8:10])
    shown = CliRunner().invoke(
        app, ["data", "preview", str(recipe_file), "--data", str(prepared), "-n", "1"]
    )
    assert shown.exit_code == 0, shown.output
    assert "training: Llama, train.kernels medlora, packed rows" in " ".join(shown.output.split())
    recipe = recipe_from_dict(
        {"model": {"name": str(tiny_model_dir)}},
        ["train.max_steps=1", "train.packing=true", "train.kernels=stock"],
    )
    train(recipe, tmp_path / "run", prepared_dir=prepared)
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["run"]["kernels"] == "stock" and env["run"]["patches"] == []
    assert "transformers sdpa with the block-diagonal mask" in env["run"]["attention"]
    card = json.loads((tmp_path / "run" / "data" / "data_card.json").read_text())
    assert card["attention"] == env["run"]["attention"]


def test_dependency_bounds_are_the_patch_registrys_tested_ranges() -> None:
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["fast"]]
    bounds = {(r := Requirement(line)).name: r.specifier for line in declared}
    for patch in patches.PATCHES.values():
        low, high = patch.tested
        specifier = bounds[patch.library]
        assert specifier.contains(low) and not specifier.contains(high), patch.name
        assert not specifier.contains(_below(low)), f"{patch.name}: floor below its tested range"
        assert any(s.operator == "<" for s in specifier), f"{patch.library} has no upper bound"


def _below(version: str) -> str:
    """A version just below `version` (5.24 -> 5.23.99, 0.3.36 -> 0.3.35)."""
    parts = [int(p) for p in version.split(".")]
    if parts[-1] == 0:
        return ".".join(map(str, [*parts[:-2], parts[-2] - 1, 99]))
    return ".".join(map(str, [*parts[:-1], parts[-1] - 1]))
