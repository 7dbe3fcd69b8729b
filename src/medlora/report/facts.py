"""What a run directory holds, read into typed results: the facts every card and page shows.

Every figure comes from files in the run directory (recipe.yaml, train_summary.json,
data/data_card.json, metrics.jsonl, charts/, eval.json, bench.json, compare.json, best.json); a
missing file is None here, and the pages say which command produces it, never a made-up number.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel

from medlora.config import Recipe, load_recipe
from medlora.errors import DataError, MedloraError
from medlora.io import read_jsonl
from medlora.results import (
    AuditResult,
    BenchResult,
    BestCheckpoint,
    CompareResult,
    DataCard,
    EvalResult,
    TrainSummary,
    read_optional,
)

# Where a local model spec stands for a Hub repo, the card names the repo (Hub-ready front matter).
HUB_BASE = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
HUB_DATASETS = {"medquad": "lavita/MedQuAD", "pubmedqa": "qiaojin/PubMedQA"}
LICENSES = {"HuggingFaceTB/SmolLM2": "apache-2.0", "meta-llama/Llama-3.2": "llama3.2"}
CHART_ORDER = ["loss", "learning_rate", "grad_norm", "quality"]  # the model card's order
T = TypeVar("T")


@dataclass(frozen=True)
class ReportOptions:
    """What `medlora report` may be told instead of the run's defaults."""

    eval_path: Path | None = None  # default RUN/eval.json
    bench_path: Path | None = None  # default RUN/bench.json
    compare_path: Path | None = None  # default RUN/compare.json
    base_model: str | None = None  # Hub id of the base (default: from the recipe's model)
    repo_id: str | None = None  # where the adapter will live (default: the run's folder)
    license: str | None = None  # the card's licence id (default: from the base model)


@dataclass
class RunFacts:
    """Everything the card and the page show, read from one run directory."""

    run_dir: Path
    recipe: Recipe
    recipe_data: dict[str, Any]  # recipe.yaml as written, for the full-recipe listing
    data_card: DataCard = field(default_factory=DataCard)
    train_summary: TrainSummary = field(default_factory=TrainSummary)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    eval: EvalResult | None = None
    bench: BenchResult | None = None
    compare: CompareResult | None = None
    best: BestCheckpoint | None = None
    audit: AuditResult | None = None  # RUN/audit.json (`medlora audit`)
    charts: list[Path] = field(default_factory=list)
    base_model: str = ""
    repo_id: str = ""
    license: str = "other"
    datasets: list[str] = field(default_factory=list)


def read_run_recipe(run: Path) -> tuple[Recipe, dict[str, Any]]:
    """The run's recipe, typed and as the mapping recipe.yaml holds."""
    recipe_file = run / "recipe.yaml"
    if not recipe_file.is_file():
        raise DataError(
            f"{run} holds no recipe.yaml: give a run directory written by `medlora train`"
        )
    try:
        data = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise DataError(f"{recipe_file}: not valid YAML ({err}); re-create it") from err
    return load_recipe(recipe_file), data


def collect(run_dir: str | os.PathLike[str], options: ReportOptions | None = None) -> RunFacts:
    """Read the run's files (only reads: nothing is written into the run)."""
    options = options or ReportOptions()
    run = Path(run_dir)
    recipe, recipe_data = read_run_recipe(run)
    for given, path in (
        ("--eval", options.eval_path),
        ("--bench", options.bench_path),
        ("--compare", options.compare_path),
    ):
        if path is not None and not Path(path).is_file():
            raise DataError(f"{given} {path}: file not found")
    metrics = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    base = options.base_model or HUB_BASE.get(recipe.model.name, recipe.model.name)
    licence = next((v for k, v in LICENSES.items() if base.startswith(k)), "other")
    return RunFacts(
        run_dir=run,
        recipe=recipe,
        recipe_data=recipe_data,
        # RUN/data_card.json: the whole card of a run made before it moved into RUN/data.
        data_card=read_optional(run / "data_card.json", DataCard)
        or read_optional(run / "data" / "data_card.json", DataCard)
        or DataCard(),
        train_summary=read_optional(run / "train_summary.json", TrainSummary) or TrainSummary(),
        metrics=metrics,
        eval=read_optional(options.eval_path or run / "eval.json", EvalResult),
        bench=read_optional(options.bench_path or run / "bench.json", BenchResult),
        compare=read_optional(options.compare_path or run / "compare.json", CompareResult),
        best=read_optional(run / "best.json", BestCheckpoint),
        audit=read_optional(run / "audit.json", AuditResult),
        charts=chart_files(run),
        base_model=base,
        repo_id=options.repo_id or str(run.resolve()),
        license=options.license or licence,
        datasets=sorted({dataset_id(s) for s in recipe.data.sources}),
    )


def chart_files(run: Path) -> list[Path]:
    """The run's charts/*.png in the model card's order."""

    def order(path: Path) -> tuple[int, str]:
        known = path.stem in CHART_ORDER
        return (CHART_ORDER.index(path.stem) if known else len(CHART_ORDER), path.stem)

    return sorted((run / "charts").glob("*.png"), key=order)


def dataset_id(source: str) -> str:
    """The Hub dataset a `KIND:PATH` source stands for (its folder name for local files)."""
    kind, _, path = source.partition(":")
    if kind == "hf":
        return path
    if kind in HUB_DATASETS:
        return HUB_DATASETS[kind]
    return Path(path).name or kind


# ---------------------------------------------------------------- what a short card can still read


class AdapterConfig(BaseModel):
    """The LoRA settings in PEFT's adapter_config.json that a card names."""

    r: int | None = None
    lora_alpha: int | float | None = None
    target_modules: list[str] | str | None = None


@dataclass
class ShortFacts:
    """What a run holds that can still be read when `collect` cannot read the whole run."""

    run_dir: Path
    base_model: str
    repo_id: str
    recipe: Recipe | None = None
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train_summary: TrainSummary = field(default_factory=TrainSummary)
    eval: EvalResult | None = None


def _lenient(read: Callable[[], T]) -> T | None:
    """What `read` returns, None when the file is unreadable (a short card leaves it out)."""
    try:
        return read()
    except (OSError, ValueError, yaml.YAMLError, MedloraError):  # ValidationError: a ValueError
        return None


def collect_short(run_dir: Path, base: str, repo_id: str | None = None) -> ShortFacts:
    """Each of the run's files that reads; the others are left out (never an error)."""
    adapter = run_dir / "adapter_config.json"
    recipe = run_dir / "recipe.yaml"
    summary = _lenient(lambda: read_optional(run_dir / "train_summary.json", TrainSummary))
    return ShortFacts(
        run_dir=run_dir,
        base_model=HUB_BASE.get(base, base),
        repo_id=repo_id or str(run_dir.resolve()),
        recipe=_lenient(lambda: load_recipe(recipe)) if recipe.is_file() else None,
        adapter=_lenient(lambda: AdapterConfig.model_validate_json(adapter.read_bytes()))
        or AdapterConfig(),
        train_summary=summary or TrainSummary(),
        eval=_lenient(lambda: read_optional(run_dir / "eval.json", EvalResult)),
    )
