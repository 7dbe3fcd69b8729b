"""`medlora data prepare` and `medlora data preview`."""

from __future__ import annotations

import json
import os
from itertools import islice
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from medlora.cli.app import (
    ColumnMapOption,
    OptionalRecipeArgument,
    SetOption,
    _load,
    _quiet_libraries,
    console,
    data_app,
    parse_map,
    user_errors,
)


@data_app.command("prepare")
@user_errors
def data_prepare(
    recipe: OptionalRecipeArgument = None,
    source: Annotated[
        list[str] | None,
        typer.Option("--source", "-s", help="KIND:PATH (repeatable); replaces data.sources."),
    ] = None,
    column_map: ColumnMapOption = None,
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
    # Nothing forks after this command's tokenizer runs: let it batch-encode on every core.
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from medlora.data.format import token_counter
    from medlora.data.prepare import prepare_data
    from medlora.models import load_tokenizer

    config = _load(recipe, set_)
    sources = source or config.data.sources
    tokenizer = load_tokenizer(config.model.name, config.model.revision)
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
    console.print(_summary(card))
    console.print(f"wrote {out}/{{train,validation,test}}.jsonl and {out}/data_card.json")


def _summary(card: dict[str, Any]) -> Table:
    """Records, topics and token lengths per split, and what cleaning and hygiene dropped."""
    table = Table(title="data prepared (details: data_card.json)", title_justify="left")
    for column in ("split", "records", "topics", "tokens p50", "p95", "max"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, count in card["splits"].items():
        lengths = (card["token_lengths"] or {}).get(name) or {}
        cells = [str(lengths.get(key, "")) for key in ("p50", "p95", "max")]
        table.add_row(name, f"{count:,}", f"{card['topics'][name]:,}", *cells)
    cleaning = sum(card["skipped"]["cleaning"].values())
    hygiene = sum(rule["dropped"] for key, rule in card["hygiene"].items() if key != "rules")
    table.add_section()
    table.add_row("dropped", f"{cleaning + hygiene:,}", "", "", "", "")
    table.caption = f"{len(card['warnings'])} warnings: see the card" if card["warnings"] else None
    return table


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
        changed = (r for r in records if r.answer != cleaned.get(r.id) and rule(r) != r.answer)
        for record in islice(changed, n):
            after = cleaned.get(record.id)
            console.rule(f"{name}: {record.id}  {record.question}")
            console.print(f"[red]raw[/]      {record.answer[:400]}", highlight=False)
            console.print(
                f"[green]cleaned[/]  {after[:400] if after is not None else '(dropped)'}",
                highlight=False,
            )
    console.print_json(json.dumps(counts))


@data_app.command("preview")
@user_errors
def data_preview(
    recipe: OptionalRecipeArgument = None,
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
    config = _load(recipe, set_)
    if hygiene:
        _preview_hygiene(config, data, n)
        return
    from medlora.data.format import format_records, preview
    from medlora.evaluate.heldout import load_eval_records
    from medlora.models import load_tokenizer

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
        console.print(preview(tokenizer, example))
    console.print(
        "[dim]dim = prompt (label -100, not trained)[/]   [bold black on green]green = trained answer tokens[/]"
    )
    if stats.dropped_no_answer_tokens:
        console.print(
            f"{stats.dropped_no_answer_tokens} examples would be dropped: no answer token fits"
        )
    from medlora.train.environment import run_plan

    plan = run_plan(config)
    console.print(f"training: {plan.family}, train.kernels {plan.kernels}, {plan.attention}")
