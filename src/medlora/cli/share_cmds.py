"""`medlora export` and `medlora push`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medlora.cli.app import (
    _quiet_libraries,
    app,
    console,
    user_errors,
)
from medlora.export.common import DEFAULT_GGUF_TYPE, GGUF_TYPE_HELP


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
    gguf_type: Annotated[str, typer.Option("--gguf-type", help=GGUF_TYPE_HELP)] = DEFAULT_GGUF_TYPE,
    base: Annotated[
        str | None, typer.Option("--base", help="Base model spec (default: the run's).")
    ] = None,
) -> None:
    """Export a run: adapter, merged model (--merge) or GGUF (--format gguf), with its model card."""
    _quiet_libraries()
    from medlora.export.run import export_run

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
