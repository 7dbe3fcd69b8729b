"""`medlora export`: adapter and merged exports of a tiny run; merged logits equal adapter logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from serve_support import train_tiny_run
from typer.testing import CliRunner

from medlora.cli import app
from medlora.export import ExportError, export_run
from medlora.models import load_model, load_with_adapter


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    run = train_tiny_run(tmp_path_factory.mktemp("export"), tiny_model_dir)
    (run / "README.md").write_text("# tiny run\n\nThe run's own model card.\n")
    return run


def test_merged_logits_equal_adapter_logits(
    tmp_path: Path, tiny_model_dir: Path, tiny_run: Path
) -> None:
    result = export_run(tiny_run, tmp_path / "merged", merge=True)
    out = result.out
    assert result.merged and (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()  # a plain model: no PEFT needed to load it
    merged, tokenizer = load_model(str(out))
    adapted, _ = load_with_adapter(str(tiny_model_dir), tiny_run)
    base, _ = load_model(str(tiny_model_dir))
    ids = tokenizer("What causes anemia? Low iron.", return_tensors="pt")
    with torch.no_grad():
        expected, got, untouched = adapted(**ids).logits, merged(**ids).logits, base(**ids).logits
    assert torch.allclose(expected, got, atol=1e-4)
    assert not torch.allclose(untouched, got, atol=1e-3)  # the LoRA update really is in the weights


def test_merged_export_is_self_contained(tmp_path: Path, tiny_run: Path) -> None:
    out = export_run(tiny_run, tmp_path / "merged", merge=True).out
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "recipe.yaml",
    ):
        assert (out / name).is_file(), name
    assert (out / "README.md").read_text() == (tiny_run / "README.md").read_text()  # the run's card
    assert (out / "chat_template.jinja").read_text() == (
        tiny_run / "chat_template.jinja"
    ).read_text()
    generation = json.loads((out / "generation_config.json").read_text())
    # A plain generate(**inputs) must not stop at the library's 20-token default, and must stop at
    # the end of the assistant's turn.
    assert generation["max_new_tokens"] >= 256
    model, tokenizer = load_model(str(out))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in generation["eos_token_id"]
    manifest = json.loads((out / "medlora_export.json").read_text())
    assert manifest["merged"] is True and manifest["base_model"]
    assert not list(tmp_path.glob(".*export.tmp"))


def test_adapter_export_reloads_like_the_run(
    tmp_path: Path, tiny_model_dir: Path, tiny_run: Path
) -> None:
    out = export_run(tiny_run, tmp_path / "adapter").out
    assert (out / "adapter_model.safetensors").is_file() and not (
        out / "model.safetensors"
    ).exists()
    from_export, tokenizer = load_with_adapter(str(tiny_model_dir), out)
    from_run, _ = load_with_adapter(str(tiny_model_dir), tiny_run)
    ids = tokenizer("Is hypertension inherited?", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(from_export(**ids).logits, from_run(**ids).logits)
    assert (out / "README.md").read_text().startswith("# tiny run")


def test_generated_card_when_the_run_has_none(
    tmp_path: Path, tiny_model_dir: Path, tiny_run: Path
) -> None:
    bare = tmp_path / "bare-run"
    bare.mkdir()
    for item in tiny_run.iterdir():
        if item.is_file() and item.name != "README.md":
            (bare / item.name).write_bytes(item.read_bytes())
    card = (export_run(bare, tmp_path / "out").out / "README.md").read_text()
    assert f"base_model: {tiny_model_dir}" in card and "not medical advice" in card


def test_cli_errors_are_one_line(tmp_path: Path, tiny_run: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "adapter_config.json" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    bad = runner.invoke(
        app, ["export", str(tiny_run), "--out", str(tmp_path / "o"), "--format", "onnx"]
    )
    assert bad.exit_code == 2 and "--format onnx" in bad.output
    with pytest.raises(ExportError, match="run directory itself"):
        export_run(tiny_run, tiny_run)
    ok = runner.invoke(app, ["export", str(tiny_run), "--out", str(tmp_path / "m"), "--merge"])
    assert ok.exit_code == 0, ok.output
    assert "merged model" in ok.output and (tmp_path / "m" / "model.safetensors").is_file()
