"""`medlora export`: adapter and merged exports of a tiny run; merged logits equal adapter logits;
the export's README.md is medlora's model card (never PEFT's template) with the charts it shows."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from serve_support import train_tiny_run
from typer.testing import CliRunner

from medlora.cli import app
from medlora.export.common import ExportError
from medlora.export.run import export_run
from medlora.models import load_model, load_with_adapter
from medlora.push import plan_push
from medlora.report.card import CARD_MARKER, write_report

# The title of the README.md peft's save_pretrained writes.
PEFT_TEMPLATE = "Model Card for Model ID"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A run as `medlora train` leaves it: adapter, charts/, and PEFT's template README.md."""
    run = train_tiny_run(tmp_path_factory.mktemp("export"), tiny_model_dir)
    readme = run / "README.md"
    # train() drops PEFT's template; older runs and hand-made PEFT folders still carry one.
    if not readme.exists() or PEFT_TEMPLATE not in readme.read_text():
        (run / "README.md").write_text(f"# {PEFT_TEMPLATE}\n\n<!-- Provide a quick summary -->\n")
    return run


def linked_images(card: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", card)


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
    card = (out / "README.md").read_text()
    assert CARD_MARKER in card and PEFT_TEMPLATE not in card
    assert (out / "chat_template.jinja").read_text() == (
        tiny_run / "chat_template.jinja"
    ).read_text()
    generation = json.loads((out / "generation_config.json").read_text())
    # A plain generate(**inputs) answers with the run's generation settings (not the library's
    # 20-token default) and stops at the end of the assistant's turn.
    run_settings = yaml.safe_load((tiny_run / "recipe.yaml").read_text()).get("generation", {})
    assert generation["max_new_tokens"] == run_settings.get("max_new_tokens", 128) > 20
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
    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    from_export, tokenizer = load_with_adapter(str(tiny_model_dir), out)
    from_run, _ = load_with_adapter(str(tiny_model_dir), tiny_run)
    ids = tokenizer("Is hypertension inherited?", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(from_export(**ids).logits, from_run(**ids).logits)
    assert CARD_MARKER in (out / "README.md").read_text()


def test_peft_template_is_replaced_by_medlora_card(
    tmp_path: Path, tiny_model_dir: Path, tiny_run: Path
) -> None:
    out = export_run(tiny_run, tmp_path / "out").out
    card = (out / "README.md").read_text()
    assert PEFT_TEMPLATE not in card and CARD_MARKER in card
    assert card.startswith("---\n") and f"base_model: {tiny_model_dir}" in card
    assert "## Training configuration" in card and "not medical advice" in card
    images = linked_images(card)
    assert "charts/loss.png" in images  # the training charts `medlora train` drew
    assert all((out / image).is_file() for image in images), images
    # Exporting wrote nothing into the run.
    assert not (tiny_run / "charts" / "quality.png").exists()
    uploaded = {name for name, _ in plan_push(out, "alice/med-model").files}
    assert {"README.md", *images} <= uploaded  # the Hub page shows the charts too


def test_reported_card_travels_with_the_merged_export(tmp_path: Path, tiny_run: Path) -> None:
    run = shutil.copytree(tiny_run, tmp_path / "run")
    write_report(run)
    (run / "figures").mkdir()
    (run / "figures" / "flow.png").write_bytes((run / "charts" / "loss.png").read_bytes())
    reported = (run / "README.md").read_text() + "\n![data flow](figures/flow.png)\n"
    (run / "README.md").write_text(reported)

    out = export_run(run, tmp_path / "merged", merge=True).out
    card = (out / "README.md").read_text()
    title = next(line for line in reported.splitlines() if line.startswith("# "))
    assert title in card and "## Normal vs fine-tuned answers" in card  # the run's own card
    assert "library_name: transformers" in card  # a merged model loads without peft
    usage = card.split("## Usage", 1)[1].split("\n## ", 1)[0]
    assert "AutoModelForCausalLM.from_pretrained" in usage and "PeftModel" not in usage
    images = linked_images(card)
    assert "figures/flow.png" in images and "charts/loss.png" in images
    assert all((out / image).is_file() for image in images), images


def test_short_card_when_the_run_files_are_unreadable(
    tmp_path: Path, tiny_model_dir: Path, tiny_run: Path
) -> None:
    run = shutil.copytree(tiny_run, tmp_path / "run")
    (run / "README.md").unlink()
    (run / "train_summary.json").write_text("{ not json")  # `medlora report` refuses this run
    card = (export_run(run, tmp_path / "out").out / "README.md").read_text()
    assert CARD_MARKER in card and f"base_model: {tiny_model_dir}" in card
    assert "LoRA r / alpha: 8 / 16" in card and "PeftModel.from_pretrained" in card
    assert "not medical advice" in card


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
