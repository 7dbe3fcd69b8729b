"""Copy a finished `medlora sweep` (its sweep.md tables and the command that made it) into
docs/benchmarks.md, under the section `sweep-<axis>`.

    python bench/sweep_section.py runs/sweep-lr [--note "what was chosen and why"] [--section NAME]

`--section` names the section when a second sweep over the same key must not replace the first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import _shared  # noqa: F401  (MEDLORA_DATA_DIR: ../shared/datasets, as in make)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _markdown import update_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sweep_dir")
    parser.add_argument("--note", default="")
    parser.add_argument("--section", default="", help="section name (default: sweep-<axis>)")
    args = parser.parse_args()
    out = Path(args.sweep_dir)
    summary = json.loads((out / "sweep.json").read_text(encoding="utf-8"))
    text = (out / "sweep.md").read_text(encoding="utf-8")
    body_lines = [
        line
        for line in text.splitlines()
        if not line.startswith(("# Sweep over", "Fixed overrides", "![sweep]"))
    ]
    body = (
        "\n".join(body_lines)
        .strip()
        .replace("## Sources never trained on", "Sources never trained on:")
    )
    fixed = summary.get("fixed_overrides") or []
    with_fixed = f" with `{'`, `'.join(fixed)}`" if args.section and fixed else ""
    section = f"""## Sweep over `{summary["axis"]}`{with_fixed}

Command: `{summary.get("command") or "medlora sweep …"}` ({os.cpu_count()} CPU cores,
{platform.machine()}, alone on the machine).

{body}
{(chr(10) + args.note + chr(10)) if args.note else ""}"""
    print(section)
    update_section(args.section or f"sweep-{summary['axis']}", section)


if __name__ == "__main__":
    main()
