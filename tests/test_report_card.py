"""`medlora report`: the model card's front matter, figures from the run's files, a usage snippet that
runs, and a self-contained report.html."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import tiny_records, write_prepared
from typer.testing import CliRunner

from medlora.cli import app


def build_reported_run(root: Path, model_dir: Path, data_dir: Path) -> dict[str, Any]:
    """Train a tiny adapter, then eval (loss + quality), bench, compare and report it."""
    from medlora.config import recipe_from_dict
    from medlora.evaluate.heldout import EvalOptions
    from medlora.evaluate.multiple_choice import BenchOptions, run_bench
    from medlora.evaluate.unseen import evaluate_run
    from medlora.models import load_with_adapter
    from medlora.report.card import write_report
    from medlora.report.compare import run_compare
    from medlora.train import train

    records = tiny_records(2)
    prepared = write_prepared(root / "prepared", records[:5], records[5:7], records[5:10])
    recipe = recipe_from_dict(
        {"model": {"name": str(model_dir)}},
        [
            "train.lr=0.02",
            "train.epochs=6",
            "train.grad_accum=1",
            "train.batch_size=5",
            "lora.dropout=0",
            "lora.target_modules=all-linear",
            "eval.max_new_tokens=24",
        ],
    )
    run = root / "run"
    train(recipe, run, prepared_dir=prepared)
    for split in prepared.glob("*.jsonl"):  # as `medlora train` leaves them when it prepares them
        shutil.copy(split, run / "data" / split.name)  # (train() wrote the run's data card there)
    loaded = load_with_adapter(str(model_dir), run)
    evaluate_run(
        EvalOptions(
            model=str(model_dir),
            data=str(run / "data"),
            adapter=run,
            split="test",
            compare_base=True,
            out=run / "eval.json",
            metrics=["loss", "rouge", "f1", "similarity"],
        ),
        model_and_tokenizer=loaded,
    )
    run_bench(
        BenchOptions(
            model=str(model_dir),
            adapter=run,
            tasks=["pubmedqa", "mmlu_medical"],
            data=[
                f"pubmedqa:{data_dir / 'pubmedqa' / 'pqal_dev.json'}",
                f"mmlu:{data_dir / 'mmlu_medical'}",
            ],
            limit=8,
            compare_base=True,
            out=run / "bench.json",
        ),
        model_and_tokenizer=loaded,
    )
    run_compare(str(model_dir), run, from_split="test", n=3, model_and_tokenizer=loaded)
    paths = write_report(run)
    return {"run": run, "paths": paths, "model": loaded}


@pytest.fixture(scope="module")
def reported(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, data_dir: Path
) -> dict[str, Any]:
    return build_reported_run(tmp_path_factory.mktemp("report"), tiny_model_dir, data_dir)


def _front_matter(card: str) -> dict[str, Any]:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, "the card starts with YAML front matter"
    return yaml.safe_load(match.group(1))


def test_card_front_matter_is_hub_ready(reported: dict[str, Any], tiny_model_dir: Path) -> None:
    card = (reported["run"] / "README.md").read_text()
    front = _front_matter(card)
    assert front["base_model"] == str(tiny_model_dir)
    assert front["library_name"] == "peft"
    assert {"medical", "lora"} <= set(front["tags"])
    assert front["datasets"] and front["license"]


def test_card_figures_come_from_the_run_files(reported: dict[str, Any]) -> None:
    run = reported["run"]
    card = (run / "README.md").read_text()
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    summary = json.loads((run / "train_summary.json").read_text())
    quality = json.loads((run / "eval.json").read_text())["quality"]["metrics"]
    bench = json.loads((run / "bench.json").read_text())["tasks"]
    compare = json.loads((run / "compare.json").read_text())

    assert (
        f"| LoRA rank r / alpha / dropout | {recipe['lora']['r']} / {recipe['lora']['alpha']}"
        in card
    )
    assert f"| optimizer steps | {summary['steps']} |" in card
    for entry in quality.values():
        m = entry["model"]
        assert f"{m['mean']:.3f} [{m['low']:.3f}, {m['high']:.3f}]" in card
        assert f"{entry['diff']['mean']:+.3f}" in card
    for name, task in bench.items():
        row = next(line for line in card.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {task['n']} | {task['chance']:.3f} | {task['base_acc']:.3f} |" in row
    assert "MiniLM similarity" in card
    change = json.loads((run / "eval.json").read_text())["example_loss_change"]
    assert f"{change['mean']:+.4f} [{change['low']:+.4f}, {change['high']:+.4f}]" in card
    assert compare["rows"][0]["base"][:40].split()[0] in card  # the side-by-side answers are there
    for chart in sorted((run / "charts").glob("*.png")):
        assert f"](charts/{chart.name})" in card
    assert "## Limitations" in card and "not medical advice" in card
    assert "recipe.yaml" in card and "lr: " in card  # the full training configuration


def test_card_usage_snippet_runs_and_answers_like_medlora(reported: dict[str, Any]) -> None:
    from medlora.evaluate.generate import generate_answers, run_generation_settings

    card = (reported["run"] / "README.md").read_text()
    snippet = re.search(r"## Usage\n\n```python\n(.*?)```", card, re.S)
    assert snippet, "the card has a python usage block"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(
        [sys.executable, "-c", snippet.group(1)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    model, tokenizer = reported["model"]
    system = yaml.safe_load((reported["run"] / "recipe.yaml").read_text())["data"]["system_prompt"]
    settings = run_generation_settings(reported["run"])  # what the card's snippet uses
    expected = generate_answers(
        model, tokenizer, ["What are the symptoms of asthma?"], system, settings
    )
    assert done.stdout.strip() == expected[0]


def test_report_html_is_self_contained(reported: dict[str, Any]) -> None:
    page = (reported["run"] / "report.html").read_text()
    charts = list((reported["run"] / "charts").glob("*.png"))
    assert page.count('src="data:image/png;base64,') == len(charts) >= 3
    assert 'src="charts/' not in page and "http://" not in page and "https://" not in page
    for table in ("config", "data", "loss", "quality", "bench", "subjects", "compare"):
        assert f'<table id="{table}"' in page or f'id="{table}"' in page, table


def test_report_cli_without_evaluations_says_what_to_run(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from medlora.config import recipe_from_dict
    from medlora.train import train

    records = tiny_records(1)
    prepared = write_prepared(tmp_path / "prepared", records, records[:2], records[:2])
    recipe = recipe_from_dict({"model": {"name": str(tiny_model_dir)}}, ["train.max_steps=2"])
    train(recipe, tmp_path / "run", prepared_dir=prepared)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--repo-id", "me/tiny-med"])
    assert result.exit_code == 0, result.output
    card = (tmp_path / "run" / "README.md").read_text()
    assert "No benchmark results: run `medlora bench" in card
    assert "No held-out evaluation in this run" in card
    assert "PeftModel.from_pretrained(base, 'me/tiny-med')" in card


def test_report_on_a_folder_without_a_run_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "holds no recipe.yaml" in result.output


CHROMIUM = "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
def test_pages_render_in_headless_chromium(reported: dict[str, Any], tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1200,1600",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    run = reported["run"]
    try:
        driver.get((run / "report.html").resolve().as_uri())
        tables = {t.get_attribute("id") for t in driver.find_elements(By.TAG_NAME, "table")}
        assert {"config", "data", "loss", "quality", "bench", "subjects", "compare"} <= tables
        images = driver.find_elements(By.TAG_NAME, "img")
        widths = [driver.execute_script("return arguments[0].naturalWidth", i) for i in images]
        assert len(widths) == len(list((run / "charts").glob("*.png"))) and all(
            w > 0 for w in widths
        )
        cells = driver.find_elements(By.CSS_SELECTOR, "#bench td")
        assert any("[" in c.text for c in cells)  # confidence intervals are shown
        report_png = tmp_path / "report.png"
        assert driver.save_screenshot(str(report_png))

        driver.get((run / "compare.html").resolve().as_uri())
        rows = driver.find_elements(By.CSS_SELECTOR, "#answers tr")
        compare = json.loads((run / "compare.json").read_text())
        assert len(rows) == 1 + len(compare["rows"])
        assert driver.find_element(By.ID, "scores").is_displayed()
        compare_png = tmp_path / "compare.png"
        assert driver.save_screenshot(str(compare_png))
    finally:
        driver.quit()
    for png in (report_png, compare_png):
        data = png.read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 20_000  # a rendered page, not a blank one
