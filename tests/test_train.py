"""Training on the tiny Llama: loss goes down, run directory is complete, adapter reloads exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_records, write_prepared

from medlora.config import recipe_from_dict
from medlora.errors import TrainingError
from medlora.models import load_model, load_with_adapter
from medlora.train import train

FAST = [
    "train.lr=0.03",
    "train.batch_size=4",
    "train.grad_accum=1",
    "train.epochs=8",
    "train.eval_steps=10",
    "train.warmup_ratio=0.0",
    "lora.r=8",
    "lora.alpha=16",
    "lora.dropout=0.0",
    "lora.target_modules=all-linear",
    "data.system_prompt=null",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("run")
    records = tiny_records()
    prepared = write_prepared(root / "prepared", records[:15], records[15:20], records[15:20])
    recipe = recipe_from_dict({"model": {"name": str(tiny_model_dir)}}, FAST)
    model, tokenizer = load_model(str(tiny_model_dir))
    result = train(
        recipe, root / "out", prepared_dir=prepared, model_and_tokenizer=(model, tokenizer)
    )
    return {
        "dir": root / "out",
        "result": result,
        "model": model,
        "tokenizer": tokenizer,
        "spec": str(tiny_model_dir),
    }


def test_loss_goes_down(trained_run: dict[str, Any]) -> None:
    rows = [
        json.loads(line) for line in (trained_run["dir"] / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3
    evals = [row["eval_loss"] for row in rows if "eval_loss" in row]
    assert evals and evals[-1] < evals[0]


def test_metrics_have_the_model_card_series(trained_run: dict[str, Any]) -> None:
    rows = [
        json.loads(line) for line in (trained_run["dir"] / "metrics.jsonl").read_text().splitlines()
    ]
    step_rows = [row for row in rows if "loss" in row]
    for key in (
        "step",
        "epoch",
        "loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_s",
        "trained_tokens",
    ):
        assert all(key in row for row in step_rows), key
    steps = [row["step"] for row in step_rows]
    assert steps == sorted(steps)
    lrs = [row["learning_rate"] for row in step_rows]
    assert lrs[-1] < lrs[0]  # linear decay


def test_run_directory_contract(trained_run: dict[str, Any]) -> None:
    run = trained_run["dir"]
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "recipe.yaml",
        "data/data_card.json",
        "metrics.jsonl",
        "chat_template.jinja",
        "tokenizer_config.json",
        "charts/loss.png",
        "charts/learning_rate.png",
        "charts/grad_norm.png",
    ):
        assert (run / name).is_file(), name
    assert not list(run.rglob("*.tmp")) and not (run / ".save.tmp").exists()
    assert (run / "charts/loss.png").read_bytes()[:4] == b"\x89PNG"
    card = json.loads((run / "data" / "data_card.json").read_text())
    assert card["used"]["train"] == 15
    assert not (run / "data_card.json").exists()  # one data card per run
    assert trained_run["result"].trained_tokens > 0


def test_saved_adapter_reloads_with_identical_logits(trained_run: dict[str, Any]) -> None:
    in_memory = trained_run["model"]  # LoRA layers were injected into this object during training
    reloaded, tokenizer = load_with_adapter(trained_run["spec"], trained_run["dir"])
    ids = tokenizer("What causes anemia?", return_tensors="pt")
    in_memory.eval()
    with torch.no_grad():
        expected = in_memory(**ids).logits
        got = reloaded(**ids).logits
        base, _ = load_model(trained_run["spec"])
        untouched = base(**ids).logits
    assert torch.allclose(expected, got, atol=1e-5)
    assert not torch.allclose(untouched, got, atol=1e-3)  # the adapter really changes the model


def test_training_refuses_when_no_token_would_be_trained(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    records = tiny_records(1)
    prepared = write_prepared(tmp_path / "prepared", records, records[:1], records[:1])
    recipe = recipe_from_dict({"model": {"name": str(tiny_model_dir)}}, ["data.max_seq_len=16"])
    with pytest.raises(TrainingError, match="no answer token would be trained"):
        train(recipe, tmp_path / "out", prepared_dir=prepared)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_untrained_end_of_turn_beside_unlikelihood_is_refused_before_any_work(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """With the end of turn never a target, unlikelihood (which pushes down every token already in
    the context, the prompt's end-of-turn tokens too) taught the demo model never to stop."""
    from medlora.errors import ConfigError

    records = tiny_records(1)
    prepared = write_prepared(tmp_path / "prepared", records, records[:1], records[:1])
    overrides = ["data.end_of_turn_loss=0", "train.unlikelihood_alpha=1.0"]
    recipe = recipe_from_dict({"model": {"name": str(tiny_model_dir)}}, overrides)
    with pytest.raises(ConfigError, match="learns never to stop"):
        train(recipe, tmp_path / "out", prepared_dir=prepared)
    assert not (tmp_path / "out").exists()


def test_fp16_without_gpu_is_a_clear_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    records = tiny_records(1)
    prepared = write_prepared(tmp_path / "prepared", records, records[:1], records[:1])
    recipe = recipe_from_dict({"model": {"name": str(tiny_model_dir)}}, ["train.precision=fp16"])
    with pytest.raises(TrainingError, match="fp16 needs a CUDA GPU"):
        train(recipe, tmp_path / "out", prepared_dir=prepared)


@pytest.mark.parametrize("packing", [False, True])
def test_neftune_noise_reaches_training_and_leaves_no_hook(
    tmp_path: Path, tiny_model_dir: Path, packing: bool
) -> None:
    """`train.neftune_noise_alpha` changes what the model sees while training (the first logged
    loss differs from the same seeded run without it) and is gone afterwards."""
    records = tiny_records()
    prepared = write_prepared(tmp_path / "prepared", records[:8], records[8:10], records[8:10])
    first_losses = []
    for alpha in ("null", "200"):
        overrides = [*FAST, "train.max_steps=1", "train.eval_steps=0", f"train.packing={packing}"]
        recipe = recipe_from_dict(
            {"model": {"name": str(tiny_model_dir)}},
            [*overrides, f"train.neftune_noise_alpha={alpha}", "train.tokens_per_batch=256"],
        )
        model, tokenizer = load_model(str(tiny_model_dir))
        out = tmp_path / f"alpha={alpha}"
        train(recipe, out, prepared_dir=prepared, model_and_tokenizer=(model, tokenizer))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        first_losses.append(next(row["loss"] for row in rows if "loss" in row))
        assert not model.get_input_embeddings()._forward_hooks  # inference is noise-free
    assert first_losses[0] != pytest.approx(first_losses[1], rel=1e-4)


def test_repetitive_training_answers_are_left_out_and_counted(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    import dataclasses

    records = tiny_records(2)
    looped = "Take the drug with food. Take the drug with food. Take the drug with food."
    train_split = [dataclasses.replace(r, answer=looped) for r in records[:3]] + records[3:]
    prepared = write_prepared(tmp_path / "prepared", train_split, records[:1], records[:1])
    recipe = recipe_from_dict(
        {"model": {"name": str(tiny_model_dir)}},
        [*FAST, "train.epochs=1", "data.max_answer_repetition=0.1"],
    )
    train(recipe, tmp_path / "out", prepared_dir=prepared)
    card = json.loads((tmp_path / "out" / "data" / "data_card.json").read_text())
    assert card["used"]["repetitive_dropped"] == 3
    assert card["used"]["train"] == len(train_split) - 3


def test_bf16_on_a_cpu_holds_the_frozen_base_in_bf16_and_trains_float32_lora(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train.precision: auto` on an AMX / AVX512-BF16 CPU: the run trains in bf16 with the frozen
    weights stored in bf16 (not re-cast every step), saves a float32 adapter that reloads, and
    its recipe.yaml says what it ran."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from medlora import machine

    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    records = tiny_records()
    prepared = write_prepared(tmp_path / "prepared", records[:8], records[8:10], records[8:10])
    recipe = recipe_from_dict(
        {"model": {"name": str(tiny_model_dir)}},
        [*FAST, "train.max_steps=3", "train.eval_steps=0", "train.precision=auto"],
    )
    model, tokenizer = load_model(str(tiny_model_dir))
    train(recipe, tmp_path / "out", prepared_dir=prepared, model_and_tokenizer=(model, tokenizer))
    frozen = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    lora = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert frozen == {torch.bfloat16} and lora == {torch.float32}
    assert "precision: bf16" in (tmp_path / "out" / "recipe.yaml").read_text()
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert losses and all(loss == loss and loss < 100 for loss in losses)  # finite
    reloaded = load_with_adapter(str(tiny_model_dir), str(tmp_path / "out"))[0]
    assert {p.dtype for n, p in reloaded.named_parameters() if "lora_" in n} == {torch.float32}


def test_loraplus_ratio_makes_the_b_matrices_learn_that_much_faster(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """`train.loraplus_lr_ratio`: B starts at zero and Adam's first step moves each element by
    about the learning rate, so after one step the largest B entry is ~lr without LoRA+ and
    ~lr x ratio with it (A gets no gradient while B is zero)."""
    records = tiny_records()
    prepared = write_prepared(tmp_path / "prepared", records[:8], records[8:10], records[8:10])
    lr = 1e-4
    largest_b = {}
    for ratio in ("null", "16"):
        recipe = recipe_from_dict(
            {"model": {"name": str(tiny_model_dir)}},
            [
                *FAST,
                f"train.lr={lr}",
                "train.max_steps=1",
                "train.eval_steps=0",
                "train.scheduler=constant",
                f"train.loraplus_lr_ratio={ratio}",
            ],
        )
        model, tokenizer = load_model(str(tiny_model_dir))
        train(
            recipe, tmp_path / ratio, prepared_dir=prepared, model_and_tokenizer=(model, tokenizer)
        )
        b = [p.detach().abs().max() for n, p in model.named_parameters() if "lora_B" in n]
        largest_b[ratio] = float(torch.stack(b).max())
    assert largest_b["null"] == pytest.approx(lr, rel=0.05)
    assert largest_b["16"] == pytest.approx(16 * lr, rel=0.05)


def test_eva_init_starts_a_from_the_answers_layer_inputs_and_the_model_at_its_base(
    tiny_model_dir: Path,
) -> None:
    """`lora.init: eva`: every A becomes orthonormal singular vectors of its layer's inputs (PEFT's
    default A is random, not orthonormal) and B stays zero, so the first step starts from the base."""
    import functools

    from medlora.data.format import format_records, pad_batch
    from medlora.train.loop import build_model, initialize_eva

    recipe = recipe_from_dict({"model": {"name": str(tiny_model_dir)}}, [*FAST, "lora.init=eva"])
    model, tokenizer = build_model(recipe, load_model(str(tiny_model_dir)))
    examples, _ = format_records(tokenizer, tiny_records()[:8], None, 256)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    ids = torch.tensor([examples[0].input_ids])
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]

    def orthonormal(layer: Any) -> bool:
        a = layer.lora_A["default"].weight.detach()
        return torch.allclose(a @ a.T, torch.eye(a.shape[0]), atol=1e-4)

    assert not any(orthonormal(layer) for layer in layers)
    initialize_eva(model, rows, functools.partial(pad_batch, pad_token_id=tokenizer.pad_token_id))
    assert layers and all(orthonormal(layer) for layer in layers)
    assert all(not layer.lora_B["default"].weight.any() for layer in layers)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, base, atol=1e-5)
