"""`medlora data prepare` on a large JSONL file: wall time and peak memory, before vs after.

    python bench/data_prepare.py --before-src /tmp/before/src [--pairs 300000] [--doc PATH]

Writes a synthetic file like a user's (`question`/`answer` rows, answers of medical-QA length,
~290 MB at 300,000 pairs, a few exact and loose duplicates; the same bytes for the same
`--pairs` and `--seed`), then runs `python -m medlora data prepare RECIPE --source jsonl:FILE` on it
as a subprocess once per code tree: `--before-src` (a copy of an older `src/`) and this working
tree's `src/`, chosen by PYTHONPATH. Wall time, CPU time and peak memory (Pss of the command and
its children, `/proc` polled) are reported with after/before ratios from the same run, and whether
both wrote the same splits and data card. Writes the `data-prepare-300k` section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _shared  # noqa: F401  (MEDLORA_DATA_DIR: ../shared/datasets, as in make)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _markdown import DOC, update_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = "smollm2-135m-cpu"
SPLIT_FILES = ("train.jsonl", "validation.jsonl", "test.jsonl")

_CONDITIONS = (
    "asthma", "type 2 diabetes", "hypertension", "migraine", "gout", "psoriasis", "celiac disease",
    "Lyme disease", "osteoporosis", "hepatitis C", "kidney stones", "shingles", "anemia", "COPD",
    "atrial fibrillation", "hypothyroidism", "Crohn's disease", "glaucoma", "eczema", "sciatica",
)  # fmt: skip
_ASKS = (
    "What are the symptoms of {}?", "How is {} treated?", "What causes {}?",
    "How is {} diagnosed?", "Who is at risk for {}?", "What is the outlook for {}?",
    "Can {} be prevented?", "What are the complications of {}?",
)  # fmt: skip
_WORDS = (
    "patients", "treatment", "may", "include", "symptoms", "doctor", "blood", "pressure", "the",
    "of", "and", "to", "in", "with", "can", "often", "disease", "medicine", "therapy", "risk",
    "chronic", "acute", "inflammation", "infection", "pain", "diagnosis", "test", "levels",
    "body", "heart", "lungs", "kidney", "liver", "skin", "joints", "nerves", "immune", "system",
    "early", "severe", "mild", "common", "rare", "weeks", "months", "years", "daily", "care",
)  # fmt: skip


def _answer(rng: random.Random, condition: str) -> str:
    """~140 words in 7 to 11 sentences, naming the condition now and then."""
    sentences = []
    for _ in range(rng.randint(7, 11)):
        words = rng.choices(_WORDS, k=rng.randint(10, 19))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), condition)
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def write_pairs(path: Path, pairs: int, seed: int) -> None:
    """`pairs` rows; about 1 % exact and 1 % case/punctuation duplicates of an earlier row."""
    rng = random.Random(seed)
    rows: list[tuple[str, str]] = []
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(pairs):
            roll = rng.random()
            if rows and roll < 0.01:
                question, answer = rows[rng.randrange(len(rows))]
            elif rows and roll < 0.02:
                question, answer = rows[rng.randrange(len(rows))]
                question, answer = question.lower().rstrip("?"), answer.upper()
            else:
                condition = rng.choice(_CONDITIONS)
                # A case number makes topics many: as many topics as a user's varied questions.
                question = rng.choice(_ASKS).format(condition) + f" (case {index})"
                answer = _answer(rng, condition)
            if len(rows) < 10_000:
                rows.append((question, answer))
            handle.write(json.dumps({"question": question, "answer": answer}) + "\n")


def peak_memory_mib(process: subprocess.Popen[bytes], poll: float = 0.05) -> float:
    """Wait for `process`; the highest memory of it and its children seen while polling.

    Proportional set sizes (Pss) are summed: a forked worker's pages shared with its parent
    count once, not once per process as summed resident sizes would count them."""
    peak = 0
    while process.poll() is None:
        peak = max(peak, _tree_pss_kib(process.pid))
        time.sleep(poll)
    return peak / 1024


def _tree_pss_kib(pid: int) -> int:
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/smaps_rollup").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:  # the process ended between polls
            continue
        for line in status.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
        pending += [int(child) for child in children]
    return total


def run_prepare(src: Path, data: Path, out: Path) -> dict[str, float]:
    """Wall time, CPU time (the command and every child it waited for) and peak memory."""
    command = [sys.executable, "-m", "medlora", "data", "prepare", RECIPE]
    command += ["--source", f"jsonl:{data}", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(src), "TERM": "dumb"}
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
        peak = peak_memory_mib(process)
        seconds = time.perf_counter() - started
        if process.returncode != 0:
            log.seek(0)
            sys.exit(f"{src}: data prepare failed:\n{log.read().decode()[-2000:]}")
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(cpu_after, f) - getattr(cpu_before, f) for f in ("ru_utime", "ru_stime"))
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_mib": peak}


def cpu_name() -> str:
    """The CPU's model and its widest vector unit (speeds differ between AVX2 and AVX-512 hosts)."""
    info = Path("/proc/cpuinfo").read_text()
    vector = "AVX-512" if "avx512f" in info else "AVX2" if "avx2" in info else "no AVX2"
    for line in info.splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} with {vector}"
    return f"{platform.machine()} with {vector}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before-src", type=Path, required=True, help="a copy of an older src/")
    parser.add_argument("--pairs", type=int, default=300_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medlora-bench-data-") as scratch:
        folder = Path(scratch)
        data = folder / "pairs.jsonl"
        write_pairs(data, args.pairs, args.seed)
        size_mb = data.stat().st_size / 1e6
        print(f"{data}: {args.pairs} pairs, {size_mb:.0f} MB", flush=True)
        results = {}
        for name, src in (("before", args.before_src.resolve()), ("after", REPO / "src")):
            results[name] = run_prepare(src, data, folder / name)
            print(f"{name}: {results[name]}", flush=True)
        same = all(
            filecmp.cmp(folder / "before" / f, folder / "after" / f, shallow=False)
            for f in SPLIT_FILES
        )
        cards = [json.loads((folder / n / "data_card.json").read_text()) for n in results]
        same = same and all(card.pop("created") and card == cards[0] for card in cards)
        splits = cards[0]["splits"]
    before = results["before"]
    rows = [
        f"| {name} | "
        + " | ".join(
            f"{r[key]:.{digits}f} | {r[key] / before[key]:.2f}"
            for key, digits in (("seconds", 1), ("cpu_seconds", 1), ("peak_mib", 0))
        )
        + " |"
        for name, r in (
            ("before (`--before-src`)", before),
            ("after (this tree)", results["after"]),
        )
    ]
    body = f"""## `medlora data prepare` on {args.pairs:,} JSONL pairs (CPU)

Command: `python bench/{Path(sys.argv[0]).name} {" ".join(sys.argv[1:])}` ({cpu_name()},
{os.cpu_count()} cores). A synthetic {size_mb:.0f} MB JSONL file (`question`/`answer`, ~140-word
answers, 1 % exact and 1 % loose duplicates) prepared with the `{RECIPE}` recipe's tokenizer, once
per code tree, one after the other. CPU time is the command's and its workers'; peak memory is the
highest sum of their proportional set sizes (Pss: pages a forked worker shares count once).
Splits written: {", ".join(f"{k} {v:,}" for k, v in splits.items())}; splits byte-identical and
data cards equal (but for `created`) before and after: {"yes" if same else "**no**"}. 1-minute load
average at the end: {os.getloadavg()[0]:.1f} (the machine is shared: CPU time is steadier than wall).

| code | wall (s) | × before | CPU (s) | × before | peak memory (MiB) | × before |
|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}
"""
    print(body)
    update_section("data-prepare-300k", body, args.doc)


if __name__ == "__main__":
    main()
