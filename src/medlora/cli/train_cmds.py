"""`medlora train`, `medlora sweep` and `medlora demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medlora.cli.app import (
    PreparedDataOption,
    RecipeArgument,
    SetOption,
    _load,
    _quiet_libraries,
    app,
    console,
    resolve_recipe_path,
    user_errors,
)


@app.command("train")
@user_errors
def train_cmd(
    recipe: RecipeArgument,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory (default: output.dir).")
    ] = None,
    data: PreparedDataOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last checkpoint.")
    ] = False,
    set_: SetOption = None,
) -> None:
    """Fine-tune with LoRA; writes the adapter, metrics.jsonl and charts into the run directory."""
    _quiet_libraries()
    from medlora.models import check_quantization

    config = _load(recipe, set_)
    check_quantization(config.model.quantization)  # no GPU/bitsandbytes: one line, nothing loaded
    from medlora.train import prepare_run_data, train, uses_splits

    run_dir = out or Path(config.output.dir)
    if data is None and uses_splits(config):
        data = prepare_run_data(config, run_dir / "data")
    result = train(config, run_dir, prepared_dir=data, resume=resume)
    console.print_json(result.model_dump_json())


@app.command("sweep")
@user_errors
def sweep_cmd(
    recipe: RecipeArgument,
    out: Annotated[Path, typer.Option("--out", "-o", help="Sweep folder: one run per value.")],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="section.key=value; exactly one with a comma list (lora.r=4,8,16,32) is the "
            "sweep axis, the others are fixed overrides.",
        ),
    ] = None,
    data: PreparedDataOption = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Retrain runs that a previous sweep finished.")
    ] = False,
    unseen: Annotated[
        bool,
        typer.Option(
            "--unseen",
            help="Also score every run on eval.unseen_sources (sources never trained on): answer "
            "loss and generated answers vs the base, with paired 95% CIs.",
        ),
    ] = False,
) -> None:
    """One LoRA run per value of one recipe key; sweep.md/json (validation loss, trainable
    parameters, train time, tokens/s, and with --unseen the held-out-source scores) and sweep.png."""
    _quiet_libraries()
    from medlora.sweep import run_sweep, summary_table

    path = resolve_recipe_path(recipe)
    result = run_sweep(
        path, set_ or [], out, prepared_dir=data, fresh=fresh, unseen=unseen, console=console
    )
    console.print(summary_table(result))
    console.print(f"wrote {out}/sweep.md, {out}/sweep.json, {out}/sweep.png")


@app.command("demo")
@user_errors
def demo_cmd(
    recipe: Annotated[
        str, typer.Option("--recipe", help="Recipe YAML or bundled name.")
    ] = "smollm2-135m-cpu",
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/demo"),
    set_: SetOption = None,
) -> None:
    """The whole pipeline on a CPU: MedQuAD, SmolLM2, LoRA, base vs tuned; writes summary.md."""
    _quiet_libraries()
    from medlora.demo import run_demo
    from medlora.report.panels import panels_markdown, transfer_sentence

    config = _load(recipe, set_)
    result = run_demo(config, out, log=console.print)
    panels = [result.test, result.unseen]
    console.print("\n".join(panels_markdown(panels)), markup=False, highlight=False)
    console.print(transfer_sentence(*panels), markup=False)
    console.print(f"see {out}/summary.md, {out}/README.md (model card), {out}/report.html")


@app.command("env")
@user_errors
def env_cmd(
    recipe: Annotated[
        str | None,
        typer.Argument(help="Recipe YAML or bundled name: also show what its run will use."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    set_: SetOption = None,
) -> None:
    """Library versions, CPU features, GPU, the patches on or skipped, and for a recipe the family,
    kernels, precision and attention path its run will use (each run keeps these in env.json)."""
    _quiet_libraries()
    from rich.table import Table

    from medlora.train.environment import environment

    facts = environment(_load(recipe, set_) if recipe else None)
    if as_json:
        console.print_json(facts.model_dump_json())
        return
    console.print(f"python {facts.python}; CPU {facts.cpu} ({', '.join(facts.cpu_features)})")
    console.print(f"GPU: {facts.gpu or 'none'}")
    console.print(", ".join(f"{name} {version}" for name, version in facts.libraries.items()))
    table = Table("patch", "stage", "library", "tested", "state")
    for p in facts.patches:
        state = p.state if p.state == "on" else f"skipped: {p.reason}; {p.fallback} instead"
        table.add_row(p.name, p.stage, f"{p.library} {p.version}", p.tested, state)
    console.print(table)
    if facts.run is not None:
        run = facts.run
        console.print(
            f"[bold]{run.model}[/bold]: {run.family}, train.kernels {run.kernels}, "
            f"precision {run.precision}, packing {run.packing}"
        )
        console.print(f"attention: {run.attention}")
        console.print(f"patches: {'; '.join(run.patches) or 'none (stock)'}")
