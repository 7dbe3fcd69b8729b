"""Progress outside a terminal: plain lines while the loop runs, not one bar at the end."""

from __future__ import annotations

import io

from medlora.progress import LineProgress, progress_bar


def test_plain_lines_report_count_and_time_left() -> None:
    stream = io.StringIO()
    with LineProgress(interval=0.0, stream=stream) as progress:
        task = progress.add_task("base answers", total=4)
        progress.advance(task, 1)
        progress.advance(task, 3)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("base answers: 1/4 (") and "s left)" in lines[0]
    assert lines[-1].startswith("base answers: 4/4 (") and "left" not in lines[-1]
    assert len(lines) == 2  # the finished task is not printed twice on exit


def test_lines_are_rate_limited_but_the_last_count_is_printed() -> None:
    stream = io.StringIO()
    with LineProgress(interval=3600.0, stream=stream) as progress:
        task = progress.add_task("scoring", total=10)
        for _ in range(6):
            progress.advance(task, 1)  # interrupted before the end: the exit prints 6/10
    assert stream.getvalue().splitlines() == [stream.getvalue().splitlines()[-1]]
    assert stream.getvalue().startswith("scoring: 6/10 (")


def test_pytest_output_is_not_a_terminal_so_lines_are_used() -> None:
    assert isinstance(progress_bar(), LineProgress)
    assert not isinstance(progress_bar(show=False), LineProgress)  # hidden: rich's disabled bar
