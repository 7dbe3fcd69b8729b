"""`medlora sweep` on the tiny Llama: run dirs, table, plot, params growing with r, one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import tiny_records, write_prepared
from typer.testing import CliRunner

from medlora.cli import app
from medlora.errors import ConfigError
from medlora.sweep import split_axis

FAST = [
    "train.lr=0.03",
    "train.batch_size=4",
    "train.grad_accum=1",
    "train.max_steps=3",
    "lora.alpha=16",
    "lora.dropout=0.0",
    "lora.target_modules=[q_proj,v_proj]",  # a YAML list stays one fixed value, not an axis
    "data.system_prompt=null",
]


def _sets(items: list[str]) -> list[str]:
    return [part for item in items for part in ("--set", item)]


@pytest.fixture(scope="module")
def sweep_setup(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sweep")
    records = tiny_records()
    prepared = write_prepared(root / "prepared", records[:15], records[15:20], records[15:20])
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": str(tiny_model_dir)}}))
    args = ["sweep", str(recipe), "--out", str(root / "out"), "--data", str(prepared)]
    args += ["--set", "lora.r=2,8", *_sets(FAST)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return {"out": root / "out", "args": args, "output": result.output}


def test_sweep_writes_runs_table_and_plot(sweep_setup: dict[str, Any]) -> None:
    out = sweep_setup["out"]
    for value in ("2", "8"):
        run = out / f"lora.r={value}"
        assert (run / "adapter_model.safetensors").is_file()
        assert yaml.safe_load((run / "recipe.yaml").read_text())["lora"]["r"] == int(value)
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "sweep.md").read_text()
    assert "| lora.r | trainable params | validation loss | train time (s) | tokens/s |" in table
    assert "score_examples" in table  # says which validation loss it is
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["axis"] == "lora.r"
    assert [row["value"] for row in summary["rows"]] == [2, 8]
    for row in summary["rows"]:
        assert math.isfinite(row["val_loss"]) and row["val_examples"] == 5
        assert row["train_time_s"] > 0 and row["tokens_per_s"] > 0 and row["steps"] == 3
    assert not list(out.rglob("*.tmp"))
    assert "sweep over lora.r" in sweep_setup["output"]


def test_trainable_parameters_grow_with_rank(sweep_setup: dict[str, Any]) -> None:
    rows = json.loads((sweep_setup["out"] / "sweep.json").read_text())["rows"]
    small, large = rows[0]["trainable_params"], rows[1]["trainable_params"]
    assert small > 0 and large == 4 * small  # LoRA parameters are linear in r
    assert rows[1]["trainable_pct"] > rows[0]["trainable_pct"]


def test_rerun_reuses_finished_runs(sweep_setup: dict[str, Any]) -> None:
    before = (sweep_setup["out"] / "lora.r=2" / "adapter_model.safetensors").stat().st_mtime_ns
    result = CliRunner().invoke(app, sweep_setup["args"])
    assert result.exit_code == 0, result.output
    assert result.output.count("finished earlier") == 2
    after = (sweep_setup["out"] / "lora.r=2" / "adapter_model.safetensors").stat().st_mtime_ns
    assert before == after


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["lora.rank=4,8"], "unknown key 'lora.rank'"),
        (["lora.r=0,8"], "invalid value lora.r=0"),
        (["lora.r=16"], "a sweep needs one --set with comma-separated values"),
        (["lora.r=4,8", "train.lr=1e-4,2e-4"], "a sweep has exactly one axis, got 2"),
        (["lora.r=0,8"], "write [a,b] for one list value"),  # brackets print (not rich markup)
    ],
)
def test_bad_axis_is_one_line(
    tmp_path: Path, tiny_model_dir: Path, sets: list[str], message: str
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": str(tiny_model_dir)}}))
    args = ["sweep", str(recipe), "--out", str(tmp_path / "out"), *_sets(sets)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_only_bare_comma_lists_are_axes() -> None:
    key, values, fixed = split_axis(
        ["lora.target_modules=[q_proj,v_proj]", "lora.r=4, 8,16", "data.system_prompt='Hi, you'"]
    )
    assert (key, values) == ("lora.r", ["4", "8", "16"])
    assert fixed == ["lora.target_modules=[q_proj,v_proj]", "data.system_prompt='Hi, you'"]
    with pytest.raises(ConfigError, match="repeated"):
        split_axis(["lora.r=4,4"])


def test_unseen_scores_every_run_against_one_base(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`--unseen`: each run gets loss and answer metrics on sources it never trained on, paired with
    the base's answers, which are generated once (every run's file holds the same base answers)."""
    records = tiny_records()
    prepared = write_prepared(tmp_path / "prepared", records[:15], records[15:20], records[15:20])
    unseen = tmp_path / "unseen.jsonl"
    unseen.write_text(
        "".join(
            json.dumps({"question": r.question + " (new source)", "answer": r.answer}) + "\n"
            for r in records[:6]
        )
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": str(tiny_model_dir)}}))
    sets = [
        *FAST,
        f"eval.unseen_sources=[jsonl:{unseen}]",
        "eval.max_examples=4",
        "eval.metrics=[rouge,f1,repetition,echo]",
        "generation.max_new_tokens=6",
    ]
    args = ["sweep", str(recipe), "--out", str(tmp_path / "out"), "--data", str(prepared)]
    args += ["--set", "train.lr=0.001,0.05", *_sets(sets), "--unseen"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert "--unseen" in summary["command"] and "--set train.lr=0.001,0.05" in summary["command"]
    rows = summary["rows"]
    base_answers = []
    for row in rows:
        u = row["unseen"]
        assert u["examples"] == 4 and math.isfinite(u["loss"]) and math.isfinite(u["base_loss"])
        assert set(u["metrics"]) == {"rougeL", "f1", "repetition", "echo"}
        assert {"model", "base", "diff"} <= set(u["metrics"]["f1"])
        lines = Path(u["predictions"]).read_text().splitlines()
        base_answers.append([json.loads(line)["base_prediction"] for line in lines])
    assert base_answers[0] == base_answers[1]
    assert rows[0]["unseen"]["base_loss"] == pytest.approx(rows[1]["unseen"]["base_loss"])
    # a larger step moves the adapter further from the base on the unseen answers
    assert rows[0]["unseen"]["loss"] != pytest.approx(rows[1]["unseen"]["loss"])
    table = (tmp_path / "out" / "sweep.md").read_text()
    assert "## Sources never trained on" in table and "answer loss (base → tuned)" in table


def test_unseen_needs_unseen_sources(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": str(tiny_model_dir)}}))
    args = ["sweep", str(recipe), "--out", str(tmp_path / "out"), "--unseen"]
    result = CliRunner().invoke(app, [*args, "--set", "lora.r=2,4"])
    assert result.exit_code != 0
    assert "--unseen scores eval.unseen_sources" in result.output
    assert "Traceback" not in result.output


def test_each_run_of_a_sweep_tracks_into_its_own_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """W&B and MLflow go to the run's folder: the second run of a sweep (same process) must not
    write into the first one's; a WANDB_DIR / MLFLOW_TRACKING_URI the user set still wins."""
    import os
    import sys
    import types

    from medlora.config import recipe_from_dict
    from medlora.train.callbacks import tracking_callbacks

    for module in ("wandb", "mlflow"):  # the sinks' packages need not be installed here
        monkeypatch.setitem(sys.modules, module, types.ModuleType(module))
    for name in ("WANDB_DIR", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(name, "")  # recorded, so the test leaves the environment as it was
        monkeypatch.delenv(name)
    recipe = recipe_from_dict(
        {"model": {"name": "tiny"}}, ["output.report_to=[jsonl,wandb,mlflow]"]
    )
    for run in ("lora.r=2", "lora.r=8"):
        tracking_callbacks(recipe, tmp_path / run)
        assert os.environ["WANDB_DIR"] == str(tmp_path / run)
        assert os.environ["MLFLOW_TRACKING_URI"] == (tmp_path / run / "mlruns").resolve().as_uri()
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "mine"))
    tracking_callbacks(recipe, tmp_path / "lora.r=16")
    assert os.environ["WANDB_DIR"] == str(tmp_path / "mine")
    assert os.environ["MLFLOW_TRACKING_URI"].endswith("lora.r%3D16/mlruns")
