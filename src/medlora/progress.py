"""Progress for medlora's long loops (answer generation, loss scoring, preference pairs).

On a terminal: rich's live bar. Anywhere else (CI logs, `nohup … > log`, a pipe) rich draws nothing
until the loop ends, so a 20-minute evaluation looks hung; there a plain line is printed at most
every `interval` seconds and once at the end: `base answers: 48/100 (41 s, ~44 s left)`.
"""

from __future__ import annotations

import sys
import time
from typing import Any


class LineProgress:
    """The subset of `rich.progress.Progress` medlora uses, printing plain lines to stderr."""

    def __init__(self, interval: float = 10.0, stream: Any = None) -> None:
        self.interval = interval
        self.stream = stream or sys.stderr
        self.tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for task_id, task in self.tasks.items():
            if task["printed"] != task["done"]:
                self._print(task_id)

    def add_task(self, description: str, total: int) -> int:
        task_id = len(self.tasks)
        now = time.monotonic()
        self.tasks[task_id] = {
            "description": description,
            "total": total,
            "done": 0,
            "started": now,
            "last": now,
            "printed": -1,
        }
        return task_id

    def advance(self, task_id: int, amount: float = 1) -> None:
        task = self.tasks[task_id]
        task["done"] += amount
        now = time.monotonic()
        if now - task["last"] >= self.interval or task["done"] >= task["total"]:
            self._print(task_id)

    def _print(self, task_id: int) -> None:
        task = self.tasks[task_id]
        now = time.monotonic()
        elapsed = now - task["started"]
        done, total = task["done"], task["total"]
        left = ""
        if 0 < done < total:
            left = f", ~{elapsed / done * (total - done):.0f} s left"
        print(
            f"{task['description']}: {done}/{total} ({elapsed:.0f} s{left})",
            file=self.stream,
            flush=True,
        )
        task["last"], task["printed"] = now, done


def progress_bar(show: bool = True, interval: float = 10.0) -> Any:
    """A context manager with `add_task(description, total=N)` and `advance(task, n)`."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if show and not console.is_terminal:
        return LineProgress(interval)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not show,
        transient=False,
    )
