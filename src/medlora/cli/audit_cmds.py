"""`medlora audit`: did a fine-tune learn its training answers or recite them (and its canaries)?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medlora.cli.app import _quiet_libraries, app, console, user_errors


@app.command("audit")
@user_errors
def audit_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory (adapter, recipe.yaml, data).")],
    questions: Annotated[
        int, typer.Option("--questions", "-n", help="Training (and held-out) questions to answer.")
    ] = 100,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Result JSON (default: RUN/audit.json).")
    ] = None,
) -> None:
    """Memorization audit: how much of their training answers tuned and base answers recite
    verbatim (held-out questions as the control), and the exposure of the run's canaries
    (recipe `data.canaries`)."""
    _quiet_libraries()
    from medlora.evaluate.memorization import AUDIT_FILE, run_audit
    from medlora.report.audit import audit_reading, audit_tables

    result = run_audit(run, questions, out)
    for table in audit_tables(result):
        console.print(table)
    for line in audit_reading(result):
        console.print(line, highlight=False, markup=False)
    console.print(f"wrote {out or run / AUDIT_FILE}")
