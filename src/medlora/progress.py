"""Progress for medlora's long loops (answer generation, loss scoring, preference pairs).

On a terminal: rich's live bar. Anywhere else (CI logs, `nohup … > log`, a pipe) rich draws nothing
until the loop ends, so a 20-minute evaluation looks hung; there a plain line is printed at most
every `interval` seconds and once at the end: `base answers: 48/100 (41 s, ~44 s left)`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class _Task:
    description: str
    total: int
    started: float
    last: float  # when its last line was printed (or it started)
    done: float = 0
    printed: float = -1  # the count its last line showed


class LineProgress:
    """The subset of `rich.progress.Progress` medlora uses, printing plain lines to stderr."""

    def __init__(self, interval: float = 10.0, stream: Any = None) -> None:
        self.interval = interval
        self.stream = stream or sys.stderr
        self.tasks: list[_Task] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for task in self.tasks:
            if task.printed != task.done:
                self._print(task)

    def add_task(self, description: str, total: int) -> int:
        now = time.monotonic()
        self.tasks.append(_Task(description, total, started=now, last=now))
        return len(self.tasks) - 1

    def advance(self, task_id: int, amount: float = 1) -> None:
        task = self.tasks[task_id]
        task.done += amount
        if time.monotonic() - task.last >= self.interval or task.done >= task.total:
            self._print(task)

    def _print(self, task: _Task) -> None:
        now = time.monotonic()
        elapsed, done, total = now - task.started, task.done, task.total
        left = f", ~{elapsed / done * (total - done):.0f} s left" if 0 < done < total else ""
        print(
            f"{task.description}: {done}/{total} ({elapsed:.0f} s{left})",
            file=self.stream,
            flush=True,
        )
        task.last, task.printed = now, done


def progress_bar(show: bool = True) -> Any:
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
        return LineProgress()
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
