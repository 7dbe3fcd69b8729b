"""Judged answers of a finished demo run: tuned vs base by an LLM judge, nothing regenerated.

    python bench/judge.py [--run runs/demo] --judge URL --judge-model NAME [--key-env VAR]
    python bench/judge.py [--run runs/demo] --serve-base [--threads N]

Judges RUN/predictions_unseen.jsonl (and RUN/predictions_test.jsonl when present) with
`medlora.evaluate.judge.judge_predictions`: each pair in both orders (a disagreement is a tie),
win / tie / loss with 95% bootstrap intervals, position consistency, and each reference's first
statements marked covered / contradicted / absent in both models' answers. `--serve-base` starts
`medlora serve` on the run's base model (smollm2-135m-instruct) on 127.0.0.1 and judges with it: a
*weak judge*, labelled so. For figures that mean something, point it at a strong judge:

    OPENAI_API_KEY=... python bench/judge.py --run runs/demo \\
        --judge https://api.openai.com/v1 --judge-model gpt-4o-mini
    # or any vLLM server: --judge http://HOST:8000 --judge-model Qwen/Qwen2.5-7B-Instruct

Replies are cached in RUN/judge_cache.jsonl (a rerun with the same judge sends no request). Writes
RUN/judge_unseen.json (and RUN/judge_test.json) and the `judge` section of docs/benchmarks.md.
The same figures from the CLI:

    medlora eval --judge URL --judge-model NAME \\
        --judge-predictions runs/demo/predictions_unseen.jsonl -o runs/demo/judge_unseen.json
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import _shared  # noqa: F401  (MEDLORA_DATA_DIR: ../shared/datasets, as in make)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _markdown import DOC, update_section  # noqa: E402

from medlora.evaluate.heldout import run_recipe  # noqa: E402
from medlora.evaluate.judge import JudgeOptions, judge_rows, read_predictions  # noqa: E402
from medlora.report.judge import judge_markdown  # noqa: E402
from medlora.results import write_result  # noqa: E402

FILES = {"unseen": "predictions_unseen.jsonl", "test": "predictions_test.jsonl"}
STRONG = (
    "OPENAI_API_KEY=... python bench/judge.py --run {run} "
    "--judge https://api.openai.com/v1 --judge-model gpt-4o-mini"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_base(spec: str, port: int, threads: int | None) -> tuple[subprocess.Popen[bytes], str]:
    """`medlora serve SPEC` (the base alone) on 127.0.0.1:PORT; returns it and its model name."""
    import httpx

    command = [sys.executable, "-m", "medlora", "serve", spec, "--port", str(port)]
    # Judge prompts carry a reference and two answers: more than serve's default 1024 tokens.
    command += ["--max-prompt-tokens", "2048", "--timeout", "1800", "--max-queue", "512"]
    command += ["--threads", str(threads)] if threads else []
    print("starting:", " ".join(command), flush=True)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}: {' '.join(command)}")
        try:
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            if health.status_code == 200:
                return process, health.json()["default_model"]
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("server did not start within 600 s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--judge", help="OpenAI-compatible URL of the judge")
    parser.add_argument("--judge-model", help="the judge's model name")
    parser.add_argument("--key-env", default="OPENAI_API_KEY", help="variable with the API key")
    parser.add_argument("--serve-base", action="store_true", help="judge with the run's base")
    parser.add_argument("--threads", type=int, default=None, help="--serve-base: CPU threads")
    parser.add_argument("--workers", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--facts", type=int, default=8, help="reference statements per answer")
    parser.add_argument(
        "--questions", type=int, default=None, help="judge the first N answers of each file"
    )
    parser.add_argument(
        "--panels", nargs="+", choices=list(FILES), default=list(FILES), help="which files"
    )
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file to update")
    args = parser.parse_args()
    if args.serve_base == bool(args.judge and args.judge_model):
        parser.error("give --judge URL --judge-model NAME, or --serve-base")
    run = Path(args.run)
    files = {
        name: run / file
        for name, file in FILES.items()
        if name in args.panels and (run / file).is_file()
    }
    if "unseen" not in files:
        raise SystemExit(f"{run / FILES['unseen']}: not found; run `medlora demo` first")

    started = time.perf_counter()
    server = None
    url, model = args.judge, args.judge_model
    spec = run_recipe(run).model.name
    if args.serve_base:
        port = free_port()
        server, model = serve_base(spec, port, args.threads)
        url = f"http://127.0.0.1:{port}"
    options = JudgeOptions(
        url=url, model=model, key_env=args.key_env, workers=args.workers, max_statements=args.facts
    )
    try:
        results = {
            name: judge_rows(
                read_predictions(path)[: args.questions], options, predictions=str(path)
            )
            for name, path in files.items()
        }
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    for name, result in results.items():
        write_result(run / f"judge_{name}.json", result)
    elapsed = time.perf_counter() - started

    command = " ".join(["python", "bench/judge.py", *sys.argv[1:]])
    if args.serve_base:
        judge_line = (
            f"Judge: the run's own base model `{spec}` served by `medlora serve` on this machine: "
            "a **weak judge** (135M parameters; HealthBench and MT-Bench use frontier models). "
            "Its verdicts show that the pipeline runs end to end, not which model is better. "
            f"For a strong judge: `{STRONG.format(run=run)}` (or a vLLM server's URL and model)."
        )
    else:
        judge_line = f"Judge: `{model}` at {results['unseen'].judge_url}."
    sections = []
    for name, result in results.items():
        title = "sources never trained on" if name == "unseen" else "the run's test split"
        sections.append(
            f"### Answers on {title} (`{files[name].name}`, {result.examples} questions)\n\n"
            + "\n".join(judge_markdown(result))
        )
    body = f"""## Judged answers: tuned vs base by an LLM judge

Command: `{command}` (run `{run}`, base `{spec}`, {os.cpu_count()} CPU cores, {platform.machine()};
{elapsed:.0f} s wall time, replies cached in `{run}/judge_cache.jsonl`). Files:
{", ".join(f"`{run}/judge_{name}.json`" for name in results)}.

{judge_line}

Method (`medlora.evaluate.judge`): every question asks for one letter (max_tokens 1, temperature
0), read from the top-5 log-probabilities; a reply that is no allowed letter is counted as
unparseable and left out. Pairwise: each pair judged with the base as answer A, then with the tuned
model as answer A, against the reference; the orders must agree, else the pair is a tie. Reference
facts: each reference's first statements (sentences of 3 words or more, at most {args.facts}) marked
covered / contradicted / absent in each answer; per-question shares, 95% percentile bootstrap over
questions, paired differences.

{chr(10).join(sections)}
"""
    print(body)
    update_section("judge", body, args.doc)


if __name__ == "__main__":
    main()
