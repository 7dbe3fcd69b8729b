"""The training engine: packing is exact, runs resume after SIGKILL to the same adapter, NaN stops,
bad output dirs fail cleanly, metrics reach TensorBoard/W&B, and 2-process DDP matches 1 process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_records, write_prepared
from safetensors.torch import load_file

from medlora.config import recipe_from_dict
from medlora.data.format import format_records, pad_batch
from medlora.data.pack import collate_packed, pack_lengths, pack_rows
from medlora.errors import TrainingError
from medlora.models import load_model
from medlora.train import train
from medlora.train.kernels import packed_attention
from medlora.train.kernels.answer_head import answer_loss_sum
from medlora.train.kernels.packed_attention import use_packed_attention

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
BASE = [
    "train.lr=0.02",
    "train.batch_size=2",
    "train.grad_accum=1",
    "train.epochs=2",
    "train.warmup_ratio=0.0",
    "train.logging_steps=1",
    "lora.r=4",
    "lora.alpha=8",
    "lora.target_modules=all-linear",
    "data.system_prompt=null",
]


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in _metrics(run_dir) if "loss" in row}


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    records = tiny_records()
    return write_prepared(tmp_path / "prepared", records[:16], records[16:20], records[16:20])


def _driver(tmp_path: Path, name: str, config: dict[str, Any]) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


# --- packing -------------------------------------------------------------------------------------


def test_packing_keeps_every_example_and_respects_the_budget() -> None:
    lengths = [50, 10, 40, 30, 60, 20, 5]
    bins = pack_lengths(lengths, budget=64)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) < len(lengths)  # really packed


@pytest.mark.parametrize("attention", ["sdpa", "packed_sdpa", "packed_sdpa_runs"])
def test_packed_loss_and_gradients_equal_unpacked_per_example(
    tiny_model_dir: Path, attention: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = load_model(str(tiny_model_dir))
    if attention != "sdpa":
        assert use_packed_attention(model)
    batched_runs: list[list[tuple[int, int]]] = []
    original = packed_attention._attend_runs
    monkeypatch.setattr(
        packed_attention,
        "_attend_runs",
        lambda q, k, v, runs, *rest: batched_runs.append(runs) or original(q, k, v, runs, *rest),
    )
    model.eval()  # no dropout: the two passes must see the same function
    examples, _ = format_records(tokenizer, tiny_records(2), None, 128)
    if attention == "packed_sdpa_runs":
        # Equal lengths side by side (answers cut at max_seq_len): attended as one batch.
        examples = [examples[0], examples[0], examples[1]]
    rows = pack_rows(examples, budget=4096)
    assert len(rows) == 1 and len(rows[0]["parts"]) == len(examples)
    packed = collate_packed(rows)
    weight = model.model.layers[0].self_attn.k_proj.weight  # grouped-query heads: 4 q, 2 kv

    total, count, _ = answer_loss_sum(model, packed)
    total.backward()
    packed_grad = weight.grad.clone()
    model.zero_grad()
    singles = [answer_loss_sum(model, pad_batch([e], tokenizer.pad_token_id)) for e in examples]
    sum(s for s, _, _ in singles).backward()
    with torch.no_grad():
        # The same row with positions running on (no restart) lets tokens see the previous example.
        leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
        leaky_total, _, _ = answer_loss_sum(model, leaky)
    assert count == sum(n for _, n, _ in singles) == sum(e.answer_tokens for e in examples)
    assert float(total.detach()) == pytest.approx(
        sum(float(s.detach()) for s, _, _ in singles), rel=1e-5
    )
    scale = float(weight.grad.abs().max())  # float32 summation order differs: tolerance to scale
    torch.testing.assert_close(packed_grad, weight.grad, rtol=1e-4, atol=1e-4 * scale)
    assert abs(float(leaky_total) - float(total)) > 1e-3 * float(total)
    # The batched path ran exactly when the row holds a run of equal lengths.
    lengths = [len(part["input_ids"]) for part in rows[0]["parts"]]
    has_run = any(a == b for a, b in zip(lengths, lengths[1:], strict=False))
    assert has_run or attention != "packed_sdpa_runs"
    assert bool(batched_runs) == (has_run and attention != "sdpa")


def test_rows_padded_to_a_width_multiple_train_the_same_and_count_only_real_tokens(
    tiny_model_dir: Path,
) -> None:
    # CPU bf16 pads packed rows to a few widths (data/pack.py row_width_multiple).
    from medlora.train.trainer import TokenCounter

    model, tokenizer = load_model(str(tiny_model_dir))
    assert use_packed_attention(model)
    model.eval()
    examples, _ = format_records(tokenizer, tiny_records(3), None, 128)
    rows = pack_rows(examples, budget=4096)
    exact, padded = collate_packed(rows), collate_packed(rows, pad_to_multiple=64)
    real = sum(len(e.input_ids) for e in examples)
    assert exact["input_ids"].shape[1] == real
    assert padded["input_ids"].shape[1] % 64 == 0 and padded["input_ids"].shape[1] > real
    with torch.no_grad():
        exact_loss, exact_count, _ = answer_loss_sum(model, exact)
        padded_loss, padded_count, _ = answer_loss_sum(model, padded)
    assert padded_count == exact_count
    assert float(padded_loss) == pytest.approx(float(exact_loss), rel=1e-5)
    counters = TokenCounter(), TokenCounter()
    counters[0].count(exact)
    counters[1].count(padded)
    assert counters[0].tokens_seen == counters[1].tokens_seen == real  # tokens/s: no padding
    assert counters[0].answer_tokens_seen == counters[1].answer_tokens_seen


def test_packed_attention_leaves_padded_batches_and_generation_unchanged(
    tiny_model_dir: Path,
) -> None:
    model, tokenizer = load_model(str(tiny_model_dir))
    model.eval()
    examples, _ = format_records(tokenizer, tiny_records(1), None, 128)
    batch = pad_batch(examples, tokenizer.pad_token_id)
    batch.pop("labels")
    prompt = tokenizer("What causes anemia?", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
        assert use_packed_attention(model)
        torch.testing.assert_close(model(**batch).logits, logits)
        assert torch.equal(model.generate(**prompt, max_new_tokens=8, do_sample=False), generated)


def test_packed_training_trains_the_same_examples_in_fewer_steps(
    tmp_path: Path, tiny_model_dir: Path, prepared: Path
) -> None:
    spec = str(tiny_model_dir)
    padded = train(
        recipe_from_dict({"model": {"name": spec}}, BASE),
        tmp_path / "padded",
        prepared_dir=prepared,
    )
    packed = train(
        recipe_from_dict(
            {"model": {"name": spec}}, [*BASE, "train.packing=true", "train.tokens_per_batch=96"]
        ),
        tmp_path / "packed",
        prepared_dir=prepared,
    )
    assert packed.trained_tokens == padded.trained_tokens  # every answer token, both ways
    assert packed.steps < padded.steps
    card = json.loads((tmp_path / "packed" / "data" / "data_card.json").read_text())
    assert card["used"]["packed_rows"] == packed.steps // 2  # two epochs
    losses = list(_losses(tmp_path / "packed").values())
    assert losses[-1] < losses[0]


# --- checkpoints, resume, NaN, output dir --------------------------------------------------------


def test_sigkill_mid_run_then_resume_ends_with_the_same_adapter(
    tmp_path: Path, tiny_model_dir: Path, prepared: Path
) -> None:
    overrides = [*BASE, "train.save_steps=3", "train.eval_steps=3", "lora.dropout=0.1"]
    common = {"model": str(tiny_model_dir), "prepared": str(prepared), "overrides": overrides}
    whole = _driver(tmp_path, "whole", {**common, "run_dir": str(tmp_path / "whole")})
    subprocess.run([sys.executable, TESTS / "train_driver.py", whole], env=_child_env(), check=True)

    killed_dir = tmp_path / "killed"
    killed = _driver(tmp_path, "killed", {**common, "run_dir": str(killed_dir), "step_sleep": 0.05})
    child = subprocess.Popen([sys.executable, TESTS / "train_driver.py", killed], env=_child_env())
    deadline = time.monotonic() + 120
    while not (killed_dir / "checkpoints/checkpoint-6/medlora_state.json").exists():
        assert child.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (killed_dir / "adapter_model.safetensors").exists()

    resumed = _driver(tmp_path, "resumed", {**common, "run_dir": str(killed_dir), "resume": True})
    subprocess.run(
        [sys.executable, TESTS / "train_driver.py", resumed], env=_child_env(), check=True
    )
    expected = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    got = load_file(killed_dir / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)
    whole_summary = json.loads((tmp_path / "whole/train_summary.json").read_text())
    resumed_summary = json.loads((killed_dir / "train_summary.json").read_text())
    assert resumed_summary["steps"] == whole_summary["steps"] == 16
    assert resumed_summary["trained_tokens"] == whole_summary["trained_tokens"]
    # One log row per step, no step logged twice, the same losses as the uninterrupted run.
    steps = [row["step"] for row in _metrics(killed_dir) if "loss" in row]
    assert steps == sorted(set(steps))
    assert _losses(killed_dir) == pytest.approx(_losses(tmp_path / "whole"), rel=1e-5)


def test_keeps_the_best_checkpoints_by_validation_loss_and_the_latest(
    tmp_path: Path, tiny_model_dir: Path, prepared: Path
) -> None:
    recipe = recipe_from_dict(
        {"model": {"name": str(tiny_model_dir)}},
        [*BASE, "train.save_steps=2", "train.eval_steps=2", "train.keep_best=2"],
    )
    train(recipe, tmp_path / "run", prepared_dir=prepared)
    kept = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run/checkpoints").iterdir())
    evals = {
        row["step"]: row["eval_loss"] for row in _metrics(tmp_path / "run") if "eval_loss" in row
    }
    best_two = sorted(sorted(evals, key=evals.get)[:2])
    assert set(kept) == set(best_two) | {16}
    assert len(kept) <= 3


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, tiny_model_dir: Path, prepared: Path
) -> None:
    model, tokenizer = load_model(str(tiny_model_dir))
    calls = {"n": 0}

    def poison(module: Any, args: Any, output: Any) -> Any:
        if module.training:
            calls["n"] += 1
            if calls["n"] > 5:  # the 6th training forward pass goes bad
                return output * float("nan")
        return output

    model.model.norm.register_forward_hook(poison)
    recipe = recipe_from_dict(
        {"model": {"name": str(tiny_model_dir)}}, [*BASE, "train.save_steps=2"]
    )
    with pytest.raises(TrainingError) as caught:
        train(
            recipe, tmp_path / "run", prepared_dir=prepared, model_and_tokenizer=(model, tokenizer)
        )
    message = str(caught.value)
    assert "loss became nan at step 6" in message and "checkpoint-4" in message
    assert "\n" not in message
    checkpoint = tmp_path / "run/checkpoints/checkpoint-4"
    weights = load_file(checkpoint / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (tmp_path / "run/adapter_model.safetensors").exists()


def test_unwritable_output_dir_is_one_clear_line(
    tmp_path: Path, tiny_model_dir: Path, prepared: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    recipe = recipe_from_dict({"model": {"name": str(tiny_model_dir)}}, BASE)
    with pytest.raises(TrainingError, match="cannot write to the run directory .*a-file/run"):
        train(recipe, blocker / "run", prepared_dir=prepared)


def test_disk_full_while_saving_leaves_no_half_written_adapter(
    tmp_path: Path, tiny_model_dir: Path, prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft import PeftModel

    def full_disk(self: Any, folder: Any, **kwargs: Any) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PeftModel, "save_pretrained", full_disk)
    recipe = recipe_from_dict({"model": {"name": str(tiny_model_dir)}}, BASE)
    with pytest.raises(TrainingError, match="No space left on device; nothing was replaced"):
        train(recipe, tmp_path / "run", prepared_dir=prepared)
    assert not (tmp_path / "run/adapter_model.safetensors").exists()
    assert not (tmp_path / "run/.save.tmp").exists()


# --- tracking ------------------------------------------------------------------------------------


def test_tensorboard_and_wandb_offline_receive_the_metrics(
    tmp_path: Path, tiny_model_dir: Path, prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    recipe = recipe_from_dict(
        {"model": {"name": str(tiny_model_dir)}},
        [*BASE, "train.epochs=1", "output.report_to=[jsonl,tensorboard,wandb]"],
    )
    run = tmp_path / "run"
    train(recipe, run, prepared_dir=prepared)
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run / "tensorboard"))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/peak_rss_mb"} <= set(
        tags
    )
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert offline_runs and list(offline_runs[0].glob("*.wandb"))
    rows = [row for row in _metrics(run) if "loss" in row]
    assert all(row["peak_rss_mb"] > 0 and row["tokens_per_s"] > 0 for row in rows)


# --- distributed ---------------------------------------------------------------------------------


def test_two_process_ddp_gives_the_same_loss_curve_as_one_process(
    tmp_path: Path, tiny_model_dir: Path, prepared: Path
) -> None:
    # eval.best_metric: each process tracks the best adapter, only rank 0 writes best/.
    fixed = [*BASE, "train.shuffle=false", "lora.dropout=0.0", "train.epochs=1"]
    fixed += ["eval.best_metric=eval_loss", "train.eval_steps=2"]
    common = {"model": str(tiny_model_dir), "prepared": str(prepared)}
    one = _driver(
        tmp_path,
        "one",
        {**common, "run_dir": str(tmp_path / "one"), "overrides": [*fixed, "train.batch_size=4"]},
    )
    two = _driver(
        tmp_path,
        "two",
        {
            **common,
            "run_dir": str(tmp_path / "two"),
            "overrides": [*fixed, "train.batch_size=2"],
            "trace_writes": str(tmp_path),
        },
    )
    subprocess.run([sys.executable, TESTS / "train_driver.py", one], env=_child_env(), check=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={_free_port()}",
            str(TESTS / "train_driver.py"),
            str(two),
        ],
        env=_child_env(),
        check=True,
    )
    single, double = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(single) == 4 and single.keys() == double.keys()
    assert list(double.values()) == pytest.approx(list(single.values()), rel=1e-4)
    assert (tmp_path / "two/adapter_model.safetensors").exists()
    # Only rank 0 writes the run's files; rank 1 trains and writes nothing in the run directory.
    rank0 = (tmp_path / "writes-rank0.txt").read_text()
    for written in ("recipe.yaml", "data/data_card.json", "best.json", "train_summary.json"):
        assert written in rank0
    rank1 = tmp_path / "writes-rank1.txt"
    assert not rank1.exists(), rank1.read_text()


def test_validation_loss_is_logged_per_data_source(tmp_path: Path, tiny_model_dir: Path) -> None:
    from medlora.data.mix import tag_source_group

    records = tiny_records()
    tag_source_group(records[:10], "medquad")
    tag_source_group(records[10:], "jsonl:mine.jsonl")
    validation = records[8:12]  # two from each source
    prepared = write_prepared(tmp_path / "prepared", records, validation, validation)
    recipe = recipe_from_dict(
        {"model": {"name": str(tiny_model_dir)}}, [*BASE, "train.epochs=1", "train.eval_steps=4"]
    )
    train(recipe, tmp_path / "run", prepared_dir=prepared)
    evals = [row for row in _metrics(tmp_path / "run") if "eval_loss" in row]
    assert evals
    for row in evals:
        medquad, mine = row["eval_loss_medquad"], row["eval_loss_jsonl:mine.jsonl"]
        assert medquad != mine
        # The overall loss is the token-weighted mix of the two, so it lies between them.
        assert min(medquad, mine) <= row["eval_loss"] <= max(medquad, mine)
