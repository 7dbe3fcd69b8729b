"""`medlora sweep`: one LoRA run per value of one recipe key, then a table and a plot.

    medlora sweep RECIPE --set lora.r=4,8,16,32 --set train.max_steps=200 --out DIR

A `--set` whose value is a bare comma list is the sweep axis (exactly one); every other `--set` is a
fixed override. YAML lists (`[a,b]`) and quoted strings stay single values. Every run goes through
`medlora.train.train()` on a fresh copy of the base model (LoRA injects layers into the model object,
so an adapted model is never reused) and lands in `DIR/<key>=<value>/`. The results are
`DIR/sweep.json`, `DIR/sweep.md` and `DIR/sweep.png`.

With `--unseen`, every run is also scored on the recipe's `eval.unseen_sources` (sources it never
trained on): answer loss and the generated answers' metrics, base vs tuned with paired 95% intervals
(`medlora.evaluate.unseen`). The base's answers are generated once and reused while the questions and
generation settings stay the same. This is the score to choose a recipe by: a lower loss on the
validation split can come with worse answers on new sources.

Validation loss here is always the same number for every run: the token-weighted answer-token
cross-entropy of the *saved* adapter on the run's validation split
(`medlora.evaluate.loss.score_examples`), not the Trainer's `eval_loss` (a mean of batch means).
"""

from __future__ import annotations

import copy
import gc
import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlora.config import Recipe, load_recipe
from medlora.errors import ConfigError
from medlora.io import write_bytes_atomic, write_json_atomic, write_text_atomic

# A sweep over one of these re-splits the data per run; any other key shares one prepared split.
PER_RUN_DATA_KEYS = frozenset(
    f"data.{k}"
    for k in ("sources", "map", "exclude", "strict", "val_fraction", "test_fraction", "clean")
)
LOSS_NOTE = (
    "validation loss = token-weighted answer-token cross-entropy of the saved adapter on the "
    "validation split (medlora.evaluate.loss.score_examples)"
)


@dataclass
class SweepPlan:
    """The axis, its values and the validated recipe of every run, before anything is trained."""

    key: str
    fixed: list[str]
    raw_values: list[str]
    recipes: list[Recipe]

    @property
    def values(self) -> list[Any]:
        return [recipe_value(r, self.key) for r in self.recipes]


@dataclass
class SweepResult:
    key: str
    out_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    command: str = ""  # the `medlora sweep` call that made it, for whoever reads the table later

    def to_dict(self) -> dict[str, Any]:
        return {
            "axis": self.key,
            "command": self.command,
            "validation_loss": LOSS_NOTE,
            "rows": self.rows,
            "files": self.files,
        }


def is_sweep_value(raw: str) -> bool:
    """A bare comma list (`4,8,16`) is a sweep; `[a,b]`, `{a: b}` and quoted text are one value."""
    text = raw.strip()
    return "," in text and text[:1] not in "[{\"'"


def split_axis(overrides: list[str]) -> tuple[str, list[str], list[str]]:
    """Pick the one `key=a,b,c` override out of `overrides`: (key, raw values, fixed overrides)."""
    axes: list[tuple[str, list[str]]] = []
    fixed: list[str] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if sep and is_sweep_value(raw):
            values = [v.strip() for v in raw.split(",")]
            if any(not v for v in values):
                raise ConfigError(f"--set '{item}': empty value in the sweep list")
            axes.append((key.strip(), values))
        else:
            fixed.append(item)
    if not axes:
        raise ConfigError(
            "a sweep needs one --set with comma-separated values, e.g. --set lora.r=4,8,16,32"
        )
    if len(axes) > 1:
        names = ", ".join(k for k, _ in axes)
        raise ConfigError(
            f"a sweep has exactly one axis, got {len(axes)} ({names}); keep one comma list and "
            "quote the others' values if they are text with commas, e.g. --set 'key=\"a, b\"'"
        )
    key, values = axes[0]
    if len(set(values)) != len(values):
        raise ConfigError(f"--set {key}=…: a value is repeated in the sweep list")
    return key, values, fixed


def recipe_value(recipe: Recipe, key: str) -> Any:
    node: Any = recipe
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part)
    return node.model_dump(mode="json") if hasattr(node, "model_dump") else node


def plan_sweep(recipe_path: str | Path | None, overrides: list[str]) -> SweepPlan:
    """Validate every run's recipe up front, so a bad value fails before hours of training."""
    key, raw_values, fixed = split_axis(overrides)
    recipes = []
    for raw in raw_values:
        try:
            recipes.append(load_recipe(recipe_path, [*fixed, f"{key}={raw}"]))
        except ConfigError as error:
            raise ConfigError(
                f"sweep axis {key}={raw}: {error} (a comma list in --set is the sweep axis; "
                "write [a,b] for one list value)"
            ) from None
    values = [recipe_value(r, key) for r in recipes]
    if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
        raise ConfigError(f"sweep axis {key}: two values mean the same thing ({raw_values})")
    return SweepPlan(key, fixed, raw_values, recipes)


def run_dir_name(key: str, raw: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", f"{key}={raw}")


def adapter_parameter_count(run_dir: Path) -> int:
    """Trainable parameters = the tensors of the saved adapter (read from its header only)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(run_dir / "adapter_model.safetensors"), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            total += math.prod(handle.get_slice(name).get_shape())
    return total


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Bases:
    """Fresh, never-adapted base models: copies of one loaded model, or reloads where a copy can't be
    made (quantized weights live on the GPU in bitsandbytes' own tensors) or the axis is the model."""

    def __init__(self, plan: SweepPlan, given: tuple[Any, Any] | None) -> None:
        first = plan.recipes[0].model
        self.per_run = plan.key.startswith("model.")
        self.pristine: Any = None
        self.tokenizer: Any = None
        if given is not None:
            self.pristine, self.tokenizer = given
        elif not self.per_run and first.quantization == "none":
            self.pristine, self.tokenizer = self._load(plan.recipes[0], training=False)

    @staticmethod
    def _load(recipe: Recipe, training: bool) -> tuple[Any, Any]:
        from medlora.models import load_recipe_model

        return load_recipe_model(recipe, training)

    def fresh(self, recipe: Recipe, training: bool) -> tuple[Any, Any]:
        if self.pristine is not None and not self.per_run:
            return copy.deepcopy(self.pristine), self.tokenizer
        return self._load(recipe, training)

    def parameter_count(self) -> int | None:
        if self.pristine is None:
            return None
        return sum(p.numel() for p in self.pristine.parameters())


def prepare_shared_data(recipe: Recipe, out: Path, tokenizer: Any) -> Path:
    """Split the data once for the whole sweep (the same validation set scores every run)."""
    from medlora.data.format import token_counter
    from medlora.data.prepare import prepare_data

    d = recipe.data
    prepare_data(
        d.sources,
        out,
        column_map=d.map or None,
        exclude=d.exclude,
        strict=d.strict,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        count_tokens=token_counter(tokenizer, d.system_prompt),
        hygiene=d.clean,
    )
    return out


def validation_loss(
    recipe: Recipe, data_dir: Path, run_dir: Path, base: tuple[Any, Any]
) -> dict[str, Any] | None:
    """Score the run's saved adapter on the validation examples training used (same sample)."""
    import torch
    from peft import PeftModel

    from medlora.data.format import format_records
    from medlora.data.prepare import load_splits
    from medlora.data.sample import sample_records
    from medlora.evaluate.loss import score_examples

    d = recipe.data
    records = sample_records(load_splits(data_dir)["validation"], d.max_val_examples, d.seed)
    model, tokenizer = base
    examples, _ = format_records(tokenizer, records, d.system_prompt, d.max_seq_len)
    if not examples:
        return None
    model = PeftModel.from_pretrained(model, run_dir)
    if recipe.model.quantization == "none" and torch.cuda.is_available():
        model.to("cuda")  # score where training ran
    scored = score_examples(model, examples, tokenizer.pad_token_id, recipe.eval.batch_size)
    return {k: scored[k] for k in ("loss", "perplexity", "examples", "answer_tokens")}


def _row_for(
    plan: SweepPlan, index: int, run_dir: Path, result: Any, val: dict[str, Any] | None
) -> dict[str, Any]:
    recipe = plan.recipes[index]
    return {
        "value": plan.values[index],
        "run_dir": str(run_dir),
        "trainable_params": adapter_parameter_count(run_dir),
        "val_loss": None if val is None else round(val["loss"], 6),
        "val_perplexity": None if val is None else round(val["perplexity"], 4),
        "val_examples": None if val is None else val["examples"],
        "val_answer_tokens": None if val is None else val["answer_tokens"],
        "train_loss": result.train_loss,
        "trainer_eval_loss": result.eval_loss,
        "steps": result.steps,
        "train_time_s": result.runtime_s,
        "tokens_per_s": result.tokens_per_s,
        "trained_tokens": result.trained_tokens,
        "recipe_yaml": recipe.to_yaml(),
    }


def _earlier_row(run_dir: Path, recipe: Recipe) -> dict[str, Any] | None:
    """A finished run of the same resolved recipe is reused (an interrupted sweep goes on)."""
    path = run_dir / "sweep_row.json"
    if not path.is_file() or not (run_dir / "adapter_model.safetensors").is_file():
        return None
    row = json.loads(path.read_text(encoding="utf-8"))
    return row if row.get("recipe_yaml") == recipe.to_yaml() else None


def run_sweep(
    recipe_path: str | Path | None,
    overrides: list[str],
    out_dir: str | Path,
    *,
    prepared_dir: str | Path | None = None,
    model_and_tokenizer: tuple[Any, Any] | None = None,
    fresh: bool = False,
    unseen: bool = False,
    console: Any = None,
) -> SweepResult:
    """Train one run per axis value (see the module docstring); returns the rows and files written.

    `model_and_tokenizer` is the untouched base to copy for every run (it is never adapted itself).
    """
    from rich.console import Console

    from medlora.evaluate.unseen import score_run_unseen
    from medlora.models import check_quantization
    from medlora.train import train

    console = console or Console(stderr=True)
    plan = plan_sweep(recipe_path, overrides)
    if unseen and not all(r.eval.unseen_sources for r in plan.recipes):
        raise ConfigError(
            "--unseen scores eval.unseen_sources and the recipe has none: add e.g. "
            "--set 'eval.unseen_sources=[medquad:9_CDC_QA]' (and keep them out with data.exclude)"
        )
    for recipe in plan.recipes:
        check_quantization(recipe.model.quantization)  # refuse QLoRA without CUDA before any load
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bases = _Bases(plan, model_and_tokenizer)
    base_params = bases.parameter_count()
    shared: Path | None = Path(prepared_dir) if prepared_dir else None
    if shared is None and plan.key not in PER_RUN_DATA_KEYS:
        tokenizer = bases.tokenizer
        if tokenizer is None:
            from medlora.models import load_tokenizer

            first = plan.recipes[0].model
            tokenizer = load_tokenizer(first.name, first.revision, first.trust_remote_code)
        with console.status("preparing data once for all runs…"):
            shared = prepare_shared_data(plan.recipes[0], out / "data", tokenizer)

    sets = " ".join(f"--set {_quoted(item)}" for item in overrides)
    data = f"--data {prepared_dir} " if prepared_dir else ""
    command = (
        f"medlora sweep {recipe_path or ''} {'--unseen ' if unseen else ''}{data}{sets} --out {out}"
    )
    result = SweepResult(plan.key, out, command=" ".join(command.split()))
    base_answers: dict[str, list[str]] = {}  # the base's unseen-source answers, per question set
    walls: list[float] = []
    total = len(plan.recipes)
    for i, (raw, recipe) in enumerate(zip(plan.raw_values, plan.recipes, strict=True)):
        run_dir = out / run_dir_name(plan.key, raw)
        label = f"[{i + 1}/{total}] {plan.key}={raw}"
        row = None if fresh else _earlier_row(run_dir, recipe)
        if row is not None:
            console.print(f"{label}: finished earlier, reusing {run_dir}", highlight=False)
        else:
            eta = f" (≈{sum(walls) / len(walls) * (total - i) / 60:.1f} min left)" if walls else ""
            console.rule(f"{label}{eta}")
            run_started = time.perf_counter()
            model, tokenizer = bases.fresh(recipe, training=True)
            trained = train(
                recipe, run_dir, prepared_dir=shared, model_and_tokenizer=(model, tokenizer)
            )
            del model  # the adapted copy; the next run starts from the untouched base
            _free_memory()
            with console.status(f"{label}: scoring the validation split…"):
                val = validation_loss(
                    recipe, shared or run_dir / "data", run_dir, bases.fresh(recipe, training=False)
                )
            _free_memory()
            row = _row_for(plan, i, run_dir, trained, val)
            write_json_atomic(run_dir / "sweep_row.json", row)
            walls.append(time.perf_counter() - run_started)
        if unseen and row.get("unseen") is None:
            console.print(f"{label}: scoring the unseen sources…", highlight=False)
            base = bases.fresh(recipe, training=False)
            row["unseen"] = score_run_unseen(recipe, run_dir, base, base_answers)
            del base
            _free_memory()
            write_json_atomic(run_dir / "sweep_row.json", row)
        if base_params:
            row["trainable_pct"] = round(100.0 * row["trainable_params"] / base_params, 4)
        result.rows.append(row)
        console.print(f"{label}: {describe_row(row)}", highlight=False)

    for row in result.rows:
        row.pop("recipe_yaml", None)  # kept in each run's sweep_row.json and recipe.yaml
    result.files = write_sweep_files(result, plan)
    return result


def _quoted(item: str) -> str:
    return item if all(c not in item for c in " []{}'\"*?") else "'" + item + "'"


def fmt_params(n: int | None) -> str:
    if n is None:
        return "–"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def describe_row(row: dict[str, Any]) -> str:
    return (
        f"validation loss {_fmt(row['val_loss'], 4)}, {fmt_params(row['trainable_params'])} "
        f"trainable, {row['train_time_s']:.1f} s, {row['tokens_per_s']:.0f} tokens/s"
    )


def markdown_table(result: SweepResult) -> str:
    lines = [
        f"| {result.key} | trainable params | validation loss | train time (s) | tokens/s | steps |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result.rows:
        pct = f" ({row['trainable_pct']:.3f}%)" if row.get("trainable_pct") is not None else ""
        lines.append(
            f"| {_value_cell(row['value'])} "
            f"| {row['trainable_params']:,}{pct} | {_fmt(row['val_loss'], 4)} "
            f"| {row['train_time_s']:.1f} | {row['tokens_per_s']:.0f} | {row['steps']} |"
        )
    return "\n".join(lines)


UNSEEN_SHOWN = {
    "rougeL": "ROUGE-L",
    "f1": "token F1",
    "similarity": "MiniLM similarity",
    "repetition": "repeated 4-grams ↓",
    "echo": "echo ↓",
}


def unseen_table(result: SweepResult) -> str:
    """Base vs tuned on the unseen sources per run: loss change, and each metric's tuned value
    with its paired difference from the base (95% CI)."""
    from medlora.report.html import fmt_ci

    rows = [r for r in result.rows if r.get("unseen")]
    if not rows:
        return ""
    names = [n for n in UNSEEN_SHOWN if n in rows[0]["unseen"]["metrics"]]
    lines = [
        f"| {result.key} | answer loss (base → tuned) | "
        + " | ".join(f"{UNSEEN_SHOWN[n]}: tuned (− base)" for n in names)
        + " |",
        "|---|---:|" + "---|" * len(names),
    ]
    for row in rows:
        u = row["unseen"]
        cells = [
            f"{u['metrics'][n]['model']['mean']:.3f} ({fmt_ci(u['metrics'][n]['diff'], signed=True)})"
            for n in names
        ]
        lines.append(
            f"| {_value_cell(row['value'])} | {u['base_loss']:.4f} → {u['loss']:.4f} "
            f"({u['loss_change_pct']:+.1f} %) | " + " | ".join(cells) + " |"
        )
    first = rows[0]["unseen"]
    g = first["generation"]
    return (
        "\n".join(lines)
        + f"\n\n- unseen sources: {', '.join(Path(d).name for d in first['data'])}, "
        f"{first['examples']} questions; answers {'sampled' if g['do_sample'] else 'greedy'}, "
        f"at most {g['max_new_tokens']} new tokens, repetition_penalty {g['repetition_penalty']}, "
        f"no_repeat_ngram_size {g['no_repeat_ngram_size']}; tuned value, then tuned − base with "
        "its paired 95% bootstrap interval (↓: lower is better).\n"
    )


def _value_cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def sweep_markdown(result: SweepResult, plan: SweepPlan) -> str:
    first = next((r for r in result.rows if r.get("val_examples")), None)
    scored = (
        f" ({first['val_examples']} examples, {first['val_answer_tokens']} answer tokens)"
        if first
        else ""
    )
    fixed = ", ".join(f"`{f}`" for f in plan.fixed) or "none"
    unseen = unseen_table(result)
    unseen = f"## Sources never trained on\n\n{unseen}\n" if unseen else ""
    return (
        f"# Sweep over `{result.key}`\n\n"
        f"Fixed overrides: {fixed}. One run per value, each under `{result.key}=VALUE/`.\n\n"
        f"{markdown_table(result)}\n\n"
        f"- {LOSS_NOTE}{scored}.\n"
        "- train time: wall time of the training loop; tokens/s: prompt + answer tokens through "
        "training steps per second of it.\n\n"
        "![sweep](sweep.png)\n" + (f"\n{unseen}" if unseen else "")
    )


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def plot_sweep(result: SweepResult) -> bytes:
    """PNG: validation loss vs the axis (points labelled with trainable params), and train time
    with trainable parameters on a second panel."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training servers
    import matplotlib.pyplot as plt

    values = [r["value"] for r in result.rows]
    numeric = _numeric(values)
    xs: list[float] = [float(v) for v in values] if numeric else list(range(len(values)))
    log2 = numeric and min(xs) > 0 and max(xs) / min(xs) >= 8
    labels = [str(v) for v in values]
    fig, (ax_loss, ax_time) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)

    points = [(x, r["val_loss"], r) for x, r in zip(xs, result.rows, strict=True)]
    scored = [(x, y, r) for x, y, r in points if y is not None]
    if scored:
        ax_loss.plot([p[0] for p in scored], [p[1] for p in scored], marker="o")
        for x, y, r in scored:
            ax_loss.annotate(
                f"{fmt_params(r['trainable_params'])} params\n{_fmt_seconds(r['train_time_s'])}",
                (x, y),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                fontsize=8,
            )
    ax_loss.margins(x=0.12, y=0.25)  # room for the labels above the points
    ax_loss.set_title("Validation answer loss (token-weighted)")
    ax_loss.set_ylabel("loss")

    positions = list(range(len(values)))  # bars read best evenly spaced, whatever the values
    ax_time.bar(positions, [r["train_time_s"] for r in result.rows], width=0.6)
    ax_time.set_ylabel("train time (s)")
    ax_time.set_title("Train time and trainable parameters")
    ax_params = ax_time.twinx()
    ax_params.plot(positions, [r["trainable_params"] for r in result.rows], color="C3", marker="s")
    ax_params.set_ylabel("trainable parameters", color="C3")

    if log2:
        ax_loss.set_xscale("log", base=2)
    for ax, ticks in ((ax_loss, xs), (ax_time, positions)):
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels)
        ax.set_xlabel(result.key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_sweep_files(result: SweepResult, plan: SweepPlan) -> dict[str, str]:
    """sweep.json, sweep.md and sweep.png, each written atomically."""
    out = result.out_dir
    files = {
        "json": str(out / "sweep.json"),
        "markdown": str(out / "sweep.md"),
        "plot": str(out / "sweep.png"),
    }
    write_bytes_atomic(out / "sweep.png", plot_sweep(result))
    write_text_atomic(out / "sweep.md", sweep_markdown(result, plan))
    result.files = files
    write_json_atomic(out / "sweep.json", {**result.to_dict(), "fixed_overrides": plan.fixed})
    return files


def summary_table(result: SweepResult) -> Any:
    """The results as a rich table, for the terminal."""
    from rich.table import Table

    table = Table(title=f"sweep over {result.key}")
    columns = [result.key, "trainable params", "validation loss", "train time (s)", "tokens/s"]
    scored = any(row.get("unseen") for row in result.rows)
    if scored:
        columns += ["unseen loss Δ", "MiniLM Δ", "repeated 4-grams (base)"]
    for name in columns:
        table.add_column(name, justify="left" if name == result.key else "right")
    for row in result.rows:
        cells = [
            str(row["value"]),
            f"{row['trainable_params']:,}",
            _fmt(row["val_loss"], 4),
            f"{row['train_time_s']:.1f}",
            f"{row['tokens_per_s']:.0f}",
        ]
        u = row.get("unseen")
        if scored and u:
            sim, rep = u["metrics"].get("similarity"), u["metrics"].get("repetition")
            cells += [
                f"{u['loss_change_pct']:+.1f} %",
                f"{sim['diff']['mean']:+.3f}" if sim else "–",
                f"{rep['model']['mean']:.3f} ({rep['base']['mean']:.3f})" if rep else "–",
            ]
        elif scored:
            cells += ["–", "–", "–"]
        table.add_row(*cells)
    return table
