"""Replace one marked section of docs/benchmarks.md, leaving the other benchmarks' sections alone."""

from __future__ import annotations

from pathlib import Path

from medlora.io import write_text_atomic

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\n"
    "Every figure here is written by a script under `bench/`, with the command that made it. The machine\n"
    "is shared and noisy, so speeds are also given as ratios against a baseline measured in the same run.\n"
)


def update_section(name: str, body: str, doc: Path = DOC) -> Path:
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = doc.read_text(encoding="utf-8") if doc.is_file() else HEADER
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    return write_text_atomic(doc, text)
