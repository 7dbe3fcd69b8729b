"""The `medlora` command: one verb per stage. It only parses arguments and calls one function."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from medlora.errors import ConfigError, MedloraError

app = typer.Typer(
    help="Turn a general LLM into a medical QA model with LoRA: data → train → eval.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
data_app = typer.Typer(help="Prepare and inspect training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])
BUNDLED_RECIPES = Path(__file__).parent / "recipes"

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe value: section.key=value (repeatable)."),
]


def user_errors(func: F) -> F:
    """Print a MedloraError as one line and exit 2; anything else is a bug and keeps its traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MedloraError as error:
            # The message is plain text: "[a,b]" in it must print, not be read as rich markup.
            err_console.print(
                Text.assemble(("error:", "bold red"), f" {error}"), highlight=False, soft_wrap=True
            )
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, advisory warnings) out of the user's terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def resolve_recipe_path(recipe: str | None) -> Path | None:
    """A recipe path, or the name of a bundled recipe (`smollm2-135m-cpu`)."""
    if recipe is None:
        return None
    path = Path(recipe)
    if path.is_file():
        return path
    bundled = BUNDLED_RECIPES / f"{recipe.removesuffix('.yaml')}.yaml"
    if bundled.is_file():
        return bundled
    names = ", ".join(sorted(p.stem for p in BUNDLED_RECIPES.glob("*.yaml")))
    raise ConfigError(f"recipe not found: {recipe} (give a YAML path or one of: {names})")


def _load(recipe: str | None, overrides: list[str] | None) -> Any:
    from medlora.config import load_recipe

    return load_recipe(resolve_recipe_path(recipe), overrides)


def parse_map(text: str | None) -> dict[str, str]:
    """`question=Q,answer=A` → {"question": "Q", "answer": "A"}."""
    if not text:
        return {}
    mapping = {}
    for part in text.split(","):
        if "=" not in part:
            raise ConfigError(f"--map '{part}' must look like question=COLUMN,answer=COLUMN")
        ours, theirs = part.split("=", 1)
        mapping[ours.strip()] = theirs.strip()
    return mapping


@data_app.command("prepare")
@user_errors
def data_prepare(
    recipe: Annotated[str | None, typer.Argument(help="Recipe YAML or bundled name.")] = None,
    source: Annotated[
        list[str] | None,
        typer.Option("--source", "-s", help="KIND:PATH (repeatable); replaces data.sources."),
    ] = None,
    column_map: Annotated[str | None, typer.Option("--map", help="question=COL,answer=COL")] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the splits and data card.")
    ] = Path("data/prepared"),
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail on malformed source files.")
    ] = False,
    set_: SetOption = None,
) -> None:
    """Read sources, clean, de-duplicate and split by topic; write JSONL splits + data_card.json."""
    _quiet_libraries()
    from medlora.data.format import token_counter
    from medlora.data.prepare import prepare_data
    from medlora.models import load_tokenizer

    config = _load(recipe, set_)
    sources = source or config.data.sources
    tokenizer = load_tokenizer(config.model.name, config.model.revision)
    with console.status("reading and splitting sources…"):
        card = prepare_data(
            sources,
            out,
            column_map=parse_map(column_map) or config.data.map or None,
            exclude=config.data.exclude,
            strict=strict or config.data.strict,
            val_fraction=config.data.val_fraction,
            test_fraction=config.data.test_fraction,
            count_tokens=token_counter(tokenizer, config.data.system_prompt),
            hygiene=config.data.clean,
        )
    console.print(f"wrote {out}/{{train,validation,test}}.jsonl and data_card.json")
    console.print_json(
        json.dumps({k: card.get(k) for k in ("splits", "skipped", "hygiene", "token_lengths")})
    )


def _preview_hygiene(config: Any, data: str | None, n: int) -> None:
    """Raw vs cleaned answers: the first `n` records each hygiene rule changed or dropped."""
    from medlora.data.clean import clean_records
    from medlora.data.hygiene import RECORD_RULES, apply_hygiene
    from medlora.data.sources import load_source

    records: list[Any] = []
    for spec in [data] if data else config.data.sources:
        records += load_source(spec, column_map=config.data.map or None)[0]
    records, _ = clean_records(records)
    kept, counts = apply_hygiene(records, config.data.clean)
    cleaned = {r.id: r.answer for r in kept}
    for name, rule in RECORD_RULES.items():
        shown = 0
        for record in records:
            if shown == n:
                break
            if record.answer == cleaned.get(record.id) or rule(record) == record.answer:
                continue
            shown += 1
            console.rule(f"{name}: {record.id}  {record.question}")
            console.print(f"[red]raw[/]      {record.answer[:400]}", highlight=False)
            after = cleaned.get(record.id)
            console.print(
                f"[green]cleaned[/]  {after[:400] if after is not None else '(dropped)'}",
                highlight=False,
            )
    console.print_json(json.dumps(counts))


@data_app.command("preview")
@user_errors
def data_preview(
    recipe: Annotated[str | None, typer.Argument(help="Recipe YAML or bundled name.")] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", help="Prepared folder or KIND:PATH (default: recipe sources)."),
    ] = None,
    n: Annotated[int, typer.Option("-n", help="How many examples to show.")] = 3,
    split: Annotated[str, typer.Option("--split")] = "train",
    hygiene: Annotated[
        bool,
        typer.Option("--hygiene", help="Show raw vs cleaned answers the hygiene rules changed."),
    ] = False,
    set_: SetOption = None,
) -> None:
    """Show formatted examples with the trained (answer) tokens highlighted."""
    _quiet_libraries()
    if hygiene:
        _preview_hygiene(_load(recipe, set_), data, n)
        return
    from medlora.data.format import format_records
    from medlora.evaluate.heldout import load_eval_records
    from medlora.models import load_tokenizer

    config = _load(recipe, set_)
    tokenizer = load_tokenizer(config.model.name, config.model.revision)
    records = load_eval_records(
        data or config.data.sources[0], split, config, config.data.map or None
    )
    examples, stats = format_records(
        tokenizer,
        records[: max(n * 4, n)],
        config.data.system_prompt,
        config.data.max_seq_len,
        config.data.truncation,
    )
    for example in examples[:n]:
        console.rule(
            f"{example.record_id}  ({example.answer_tokens} trained / {len(example.input_ids)} tokens)"
        )
        from medlora.data.format import preview

        console.print(preview(tokenizer, example))
    console.print(
        "[dim]dim = prompt (label -100, not trained)[/]   [bold black on green]green = trained answer tokens[/]"
    )
    if stats.dropped_no_answer_tokens:
        console.print(
            f"{stats.dropped_no_answer_tokens} examples would be dropped: no answer token fits"
        )


@app.command("train")
@user_errors
def train_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML or bundled name (smollm2-135m-cpu).")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory (default: output.dir).")
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="Folder written by `medlora data prepare`.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last checkpoint.")
    ] = False,
    set_: SetOption = None,
) -> None:
    """Fine-tune with LoRA; writes the adapter, metrics.jsonl and charts into the run directory."""
    _quiet_libraries()
    from medlora.models import check_quantization
    from medlora.train import train

    config = _load(recipe, set_)
    check_quantization(config.model.quantization)  # no GPU/bitsandbytes: one line, nothing loaded
    run_dir = out or Path(config.output.dir)
    result = train(config, run_dir, prepared_dir=data, resume=resume)
    console.print_json(json.dumps(result.to_dict()))


@app.command("sweep")
@user_errors
def sweep_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML or bundled name (smollm2-135m-cpu).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Sweep folder: one run per value.")],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="section.key=value; exactly one with a comma list (lora.r=4,8,16,32) is the "
            "sweep axis, the others are fixed overrides.",
        ),
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="Folder written by `medlora data prepare`.")
    ] = None,
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


@app.command("eval")
@user_errors
def eval_cmd(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model spec (Hub id, folder, .gguf, alias).")
    ],
    data: Annotated[str, typer.Option("--data", "-d", help="KIND:PATH or a prepared folder.")],
    adapter: Annotated[
        Path | None, typer.Option("--adapter", "-a", help="Run directory with the adapter.")
    ] = None,
    split: Annotated[str, typer.Option("--split", help="test | validation | train | all")] = "test",
    limit: Annotated[int | None, typer.Option("--limit", help="Score at most N examples.")] = None,
    compare_base: Annotated[
        bool, typer.Option("--compare-base", help="Also score the base model in the same run.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write results JSON here.")
    ] = None,
    column_map: Annotated[str | None, typer.Option("--map", help="question=COL,answer=COL")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    metrics: Annotated[
        str, typer.Option("--metrics", help="Comma-separated: loss, rouge, f1, similarity.")
    ] = "loss",
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", help="Longest generated answer.")
    ] = None,
    predictions: Annotated[
        Path | None,
        typer.Option("--predictions", help="Per-example answers (default: beside --out)."),
    ] = None,
) -> None:
    """Held-out scores: answer-only loss and perplexity; with --metrics also generated-answer
    quality (ROUGE-L, token F1, MiniLM similarity) with 95% bootstrap confidence intervals."""
    _quiet_libraries()
    from medlora.evaluate.quality import evaluate_run, parse_metrics

    if compare_base and adapter is None:
        raise ConfigError("--compare-base compares an adapter with its base: add --adapter RUN_DIR")
    wanted = parse_metrics(metrics)
    with console.status("scoring…"):
        result = evaluate_run(
            model,
            data,
            adapter,
            split,
            limit,
            compare_base,
            out,
            batch_size,
            parse_map(column_map) or None,
            wanted,
            max_new_tokens,
            predictions,
        )
    if "loss" in result:
        line = f"{result['examples']} examples, {result['answer_tokens']} answer tokens: "
        line += f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}"
        if "base_loss" in result:
            line += f"   base loss {result['base_loss']:.4f}  base perplexity {result['base_perplexity']:.2f}"
            line += f"   change {result['loss_change']:+.4f}"
        console.print(line)
        if "example_loss_change" in result:
            from medlora.report.html import fmt_ci

            change = fmt_ci(result["example_loss_change"], 4, signed=True)
            console.print(f"mean per-example loss change, tuned − base [95% CI]: {change}")
    if "quality" in result:
        _print_quality(result["quality"])
    if out:
        console.print(f"wrote {out}")


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

    config = _load(recipe, set_)
    from medlora.demo import metric_table

    summary = run_demo(config, out, log=console.print)
    unseen = summary["unseen"]
    console.print(
        f"unseen sources ({unseen['examples']} questions): answer loss base "
        f"{unseen['base_loss']:.4f} → tuned {unseen['loss']:.4f} ({unseen['loss_change_pct']:+.1f} %)"
    )
    console.print("\n".join(metric_table(unseen["quality"])), highlight=False)
    console.print(f"see {out}/summary.md")


@app.command("export")
@user_errors
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory from `medlora train`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the export into.")],
    merge: Annotated[
        bool, typer.Option("--merge", help="Merge LoRA into the base (merge_and_unload).")
    ] = False,
    fmt: Annotated[
        str, typer.Option("--format", help="hf | gguf (llama.cpp; implies --merge).")
    ] = "hf",
    gguf_type: Annotated[
        str, typer.Option("--gguf-type", help="GGUF weights: q8_0 | q4_0 | f16 | bf16 | f32.")
    ] = "q8_0",
    base: Annotated[
        str | None, typer.Option("--base", help="Base model spec (default: the run's).")
    ] = None,
) -> None:
    """Export a run: adapter, merged model (--merge) or GGUF (--format gguf), with its model card."""
    _quiet_libraries()
    from medlora.export import export_run

    with console.status("exporting…"):
        result = export_run(run_dir, out, merge=merge, fmt=fmt, gguf_type=gguf_type, base=base)
    kind = "merged model" if result.merged else "adapter"
    console.print(
        f"wrote {kind} to {out} ({len(result.files)} files{', model.gguf' if result.gguf else ''})"
    )


@app.command("push")
@user_errors
def push_cmd(
    folder: Annotated[Path, typer.Argument(help="Folder written by `medlora export`.")],
    repo: Annotated[
        str, typer.Option("--repo", help="Hub model repo USER/NAME (created if missing).")
    ],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be uploaded; send nothing.")
    ] = False,
) -> None:
    """Upload an export to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`)."""
    from medlora.push import push_folder

    plan, url = push_folder(folder, repo, private=private, dry_run=dry_run)
    for name, size in plan.files:
        console.print(f"  {size:>12,d}  {name}", highlight=False)
    total = f"{len(plan.files)} files, {plan.total_bytes / 2**20:.1f} MiB"
    if dry_run:
        console.print(f"dry run: would upload {total} to {repo}{' (private)' if private else ''}")
    else:
        console.print(f"uploaded {total}: {url}")


EngineOption = Annotated[
    str,
    typer.Option(
        "--engine", help="auto (llama.cpp when installed) | transformers | llama.cpp | vllm."
    ),
]
AdapterOption = Annotated[
    Path | None, typer.Option("--adapter", "-a", help="Run directory with the adapter.")
]


@app.command("chat")
@user_errors
def chat_cmd(
    spec: Annotated[str, typer.Argument(help="Base model spec (alias, folder, .gguf, Hub id).")],
    adapter: AdapterOption = None,
    engine: EngineOption = "auto",
    max_new_tokens: Annotated[
        int | None,
        typer.Option("--max-new-tokens", min=1, help="Default: the run's generation settings."),
    ] = None,
) -> None:
    """Talk to the model in the terminal: streaming, multi-turn, /reset for a new conversation."""
    _quiet_libraries()
    from medlora.chat import Chat, chat_loop
    from medlora.serve.loader import build_engine

    with console.status("loading…"):
        served = build_engine(spec, adapter, engine=engine, with_base=False)
    chat_loop(Chat(served, max_new_tokens), console, read=console.input)


@app.command("generate")
@user_errors
def generate_cmd(
    spec: Annotated[str, typer.Argument(help="Base model spec (alias, folder, .gguf, Hub id).")],
    in_path: Annotated[
        Path, typer.Option("--in", help='JSONL with one {"question": ...} per line.')
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="JSONL to write, one answer per question.")
    ],
    adapter: AdapterOption = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    max_new_tokens: Annotated[
        int | None,
        typer.Option("--max-new-tokens", min=1, help="Default: the run's generation settings."),
    ] = None,
) -> None:
    """Answer a file of questions in batches (greedy, merged weights, the run's chat template)."""
    _quiet_libraries()
    from medlora.chat import generate_file

    with console.status("answering…") as status:
        rows = generate_file(
            spec,
            adapter,
            in_path,
            out,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            log=lambda line: status.update(f"answering… {line}"),
        )
    console.print(f"wrote {len(rows)} answers to {out}")


@app.command("serve")
@user_errors
def serve_cmd(
    spec: Annotated[str, typer.Argument(help="Base model spec (alias, folder, .gguf, Hub id).")],
    adapter: AdapterOption = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    engine: EngineOption = "auto",
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="MEDLORA_API_KEY", help="Require Bearer KEY on /v1."),
    ] = None,
    base: Annotated[
        bool, typer.Option("--base/--no-base", help="Also serve the base model (side by side).")
    ] = True,
    max_prompt_tokens: Annotated[int, typer.Option("--max-prompt-tokens", min=1)] = 1024,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, help="Most a request may ask.")
    ] = 512,
    max_body_kb: Annotated[int, typer.Option("--max-body-kb", min=1)] = 256,
    max_queue: Annotated[
        int, typer.Option("--max-queue", min=1, help="Waiting requests before 429.")
    ] = 64,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Requests per batch.")] = 8,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds before a request gets 504.")
    ] = 120.0,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads", help="CPU threads (default: OMP_NUM_THREADS, else physical cores)."
        ),
    ] = None,
    gguf_type: Annotated[
        str,
        typer.Option(
            "--gguf-type",
            help="llama.cpp weights: q8_0 | q4_0 (faster, answers differ more) | f16 | bf16 | f32.",
        ),
    ] = "q8_0",
    log_prompts: Annotated[
        bool, typer.Option("--log-prompts", help="Log prompts and answers.")
    ] = False,
    disclaimer: Annotated[
        str | None, typer.Option("--disclaimer", help="Text added to every answer.")
    ] = None,
    no_disclaimer: Annotated[bool, typer.Option("--no-disclaimer")] = False,
    no_emergency_notice: Annotated[bool, typer.Option("--no-emergency-notice")] = False,
) -> None:
    """OpenAI-compatible API (/v1/chat/completions, /v1/models), /health and a chat page at /."""
    _quiet_libraries()
    import logging

    from medlora.serve.safety import DEFAULT_DISCLAIMER, Safety

    if engine == "vllm":
        import subprocess

        from medlora.serve.loader import vllm_command

        command = vllm_command(
            spec, adapter, host, port, api_key, max_new_tokens, max_prompt_tokens
        )
        console.print(
            "starting: " + " ".join(c if c != api_key else "***" for c in command), highlight=False
        )
        raise typer.Exit(subprocess.call(command))
    import uvicorn

    from medlora.serve.app import Limits, create_app
    from medlora.serve.loader import build_engine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with console.status("loading…"):
        served = build_engine(
            spec,
            adapter,
            engine=engine,
            with_base=base,
            max_batch=max_batch,
            threads=threads,
            n_ctx=max_prompt_tokens + max_new_tokens,
            gguf_type=gguf_type,
        )
    safety = Safety(
        disclaimer=None if no_disclaimer else (disclaimer or DEFAULT_DISCLAIMER),
        emergency_notices=not no_emergency_notice,
    )
    limits = Limits(
        api_key=api_key,
        max_prompt_tokens=max_prompt_tokens,
        max_new_tokens=max_new_tokens,
        default_max_tokens=min(served.generation.max_new_tokens, max_new_tokens),
        max_body_bytes=max_body_kb * 1024,
        max_queue=max_queue,
        request_timeout_s=timeout,
        log_prompts=log_prompts,
        safety=safety,
    )
    console.print(
        f"serving {', '.join(served.engine.models)} with {served.engine.name} on http://{host}:{port} "
        f"(chat page at /, API at /v1{', key required' if api_key else ''})"
    )
    uvicorn.run(create_app(served, limits), host=host, port=port, log_level="warning")


def _print_quality(quality: dict[str, Any]) -> None:
    from medlora.evaluate.quality import LOWER_IS_BETTER
    from medlora.report.html import fmt_ci, verdict

    console.print(
        f"{quality['examples']} answers ({quality['decoding']}, ≤{quality['max_new_tokens']} new "
        f"tokens, {quality['empty_predictions']} empty); mean [95% CI]:"
    )
    for name, entry in quality["metrics"].items():
        line = f"  {name:<11} {fmt_ci(entry['model'])}"
        if "base" in entry:
            line += (
                f"   base {fmt_ci(entry['base'])}   difference {fmt_ci(entry['diff'], signed=True)}"
            )
            line += f" ({verdict(entry['diff'], name not in LOWER_IS_BETTER)})"
        console.print(line)
    if quality.get("predictions"):
        console.print(f"answers: {quality['predictions']}")


@app.command("bench")
@user_errors
def bench_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="Model spec.")],
    tasks: Annotated[
        str,
        typer.Option(
            "--tasks",
            help="pubmedqa, mmlu_medical, mmlu_medical_continuation, mmlu, medmcqa, medqa",
        ),
    ] = "pubmedqa,mmlu_medical",
    adapter: Annotated[Path | None, typer.Option("--adapter", "-a", help="Run directory.")] = None,
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data",
            help="KIND:PATH (repeatable): pubmedqa:FILE, mmlu:DIR, medmcqa:FILE, medqa:FILE "
            "(default: under $MEDLORA_DATA_DIR).",
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="At most N questions per task.")
    ] = None,
    shots: Annotated[int, typer.Option("--shots", help="Few-shot exemplars (0: zero-shot).")] = 0,
    compare_base: Annotated[
        bool, typer.Option("--compare-base", help="Also score the base model in the same run.")
    ] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Results JSON.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    chat: Annotated[
        bool, typer.Option("--chat", help="Wrap prompts in the chat template (default: raw).")
    ] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on a bad row.")] = False,
) -> None:
    """Multiple-choice medical benchmarks scored by option log-likelihood (lm-evaluation-harness)."""
    _quiet_libraries()
    from medlora.evaluate.multiple_choice import run_bench
    from medlora.report.html import fmt, fmt_ci

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    result = run_bench(
        model,
        adapter,
        names,
        data or [],
        limit,
        shots,
        compare_base,
        out,
        batch_size,
        chat,
        strict,
        progress=console.print,
    )
    for task, r in result["tasks"].items():
        line = f"{task}: n={r['n']}  acc {fmt_ci(r['acc_ci'])}  acc_norm {fmt(r['acc_norm'])}"
        line += f"  chance {fmt(r['chance'])}"
        if "base_acc" in r:
            line += f"  | base acc {fmt(r['base_acc'])}  acc_norm {fmt(r['base_acc_norm'])}"
            line += f"  | difference {fmt_ci(r['diff_acc'], signed=True)}"
        console.print(line)
        if len(r["subjects"]) > 1:
            for subject, s in r["subjects"].items():
                base = f"  base {fmt(s['base_acc'])}" if "base_acc" in s else ""
                console.print(
                    f"  {subject:<22} n={s['n']:<4} acc {fmt(s['acc'])}{base}  "
                    f"chance {fmt(s['chance'])}"
                )
            console.print(
                f"  {'macro average':<22} acc {fmt(r['macro_acc'])}  chance {fmt(r['chance'])}"
            )
        if r["skipped"]:
            console.print(f"  skipped rows: {r['skipped']}")
    if out:
        console.print(f"wrote {out}")


@app.command("compare")
@user_errors
def compare_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="Base model spec.")],
    adapter: Annotated[Path, typer.Option("--adapter", "-a", help="Run directory.")],
    questions: Annotated[
        Path | None, typer.Option("--questions", help=".txt/.jsonl/.json/.csv of questions.")
    ] = None,
    from_split: Annotated[
        str | None, typer.Option("--from-split", help="Take questions from the run's split.")
    ] = None,
    n: Annotated[int, typer.Option("--n", help="How many questions.")] = 20,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Folder for compare.* (default: the run).")
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 4,
) -> None:
    """Base vs fine-tuned answers side by side: compare.html, compare.md, compare.json."""
    _quiet_libraries()
    from medlora.report.compare import run_compare
    from medlora.report.html import fmt_ci

    with console.status("answering with both models…"):
        result = run_compare(
            model, adapter, questions, from_split, n, out, max_new_tokens, batch_size
        )
    for name, m in result["metrics"].items():
        console.print(
            f"{name}: base {fmt_ci(m['base'])}  fine-tuned {fmt_ci(m['model'])}  "
            f"difference {fmt_ci(m['diff'], signed=True)}"
        )
    console.print("wrote " + ", ".join(result["files"].values()))


@app.command("report")
@user_errors
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.")],
    eval_file: Annotated[
        Path | None, typer.Option("--eval", help="Eval JSON (default RUN/eval.json).")
    ] = None,
    bench_file: Annotated[
        Path | None, typer.Option("--bench", help="Bench JSON (default RUN/bench.json).")
    ] = None,
    compare_file: Annotated[
        Path | None, typer.Option("--compare", help="compare.json (default RUN/compare.json).")
    ] = None,
    base_model: Annotated[
        str | None, typer.Option("--base-model", help="Hub id of the base for the card.")
    ] = None,
    repo_id: Annotated[
        str | None, typer.Option("--repo-id", help="Hub repo the adapter will live in.")
    ] = None,
    license_: Annotated[str | None, typer.Option("--license", help="Card licence id.")] = None,
) -> None:
    """report.html (self-contained) and a Hub-ready README.md model card, from the run's files."""
    from medlora.report.card import write_report

    paths = write_report(
        run_dir,
        eval_path=eval_file,
        bench_path=bench_file,
        compare_path=compare_file,
        base_model=base_model,
        repo_id=repo_id,
        license=license_,
    )
    console.print(f"wrote {paths['card']} and {paths['html']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
