"""Load test: 32 concurrent clients × 4 requests against `medlora serve` on the demo model.

    python bench/load_test.py [--run RUN_DIR] [--engines transformers,llama.cpp] [--clients 32]
                              [--requests 4] [--max-tokens 64] [--rounds 2] [--threads N]

For each engine: start the real server (a subprocess on 127.0.0.1), ask every distinct question once
alone (the single-request greedy answer), then run `--rounds` rounds of the concurrent load and check
that every answer equals its single-request answer. Reports p50/p95 latency, completion tokens/s over
the round's wall time, errors, and the server's resident memory after each phase (from /health).
Writes the `serve-load` section of docs/benchmarks.md. Traffic goes to 127.0.0.1 only and every loop
is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _markdown import update_section  # noqa: E402
from _shared import QUESTIONS, SPEC, default_run  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    run: Path, engine: str, port: int, max_tokens: int, threads: int
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "medlora.cli",
        "serve",
        SPEC,
        "--adapter",
        str(run),
        "--no-base",
        "--engine",
        engine,
        "--port",
        str(port),
        "--max-queue",
        "256",
        "--timeout",
        "900",
        "--max-new-tokens",
        str(max_tokens),
        "--threads",
        str(threads),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600  # a first llama.cpp start converts the merged model once
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}: {' '.join(command)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("server did not start within 600 s")


async def ask(client: httpx.AsyncClient, question: str, max_tokens: int) -> dict[str, Any]:
    started = time.perf_counter()
    response = await client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens},
    )
    latency = time.perf_counter() - started
    if response.status_code != 200:
        return {
            "question": question,
            "status": response.status_code,
            "latency": latency,
            "tokens": 0,
            "text": None,
        }
    body = response.json()
    return {
        "question": question,
        "status": 200,
        "latency": latency,
        "tokens": body["usage"]["completion_tokens"],
        "text": body["choices"][0]["message"]["content"],
    }


async def load_round(
    url: str, clients: int, per_client: int, max_tokens: int
) -> tuple[list[dict[str, Any]], float]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:

        async def one_client(index: int) -> list[dict[str, Any]]:
            results = []
            for k in range(per_client):
                question = QUESTIONS[(index * per_client + k) % len(QUESTIONS)]
                results.append(await ask(client, question, max_tokens))
            return results

        started = time.perf_counter()
        groups = await asyncio.gather(*(one_client(i) for i in range(clients)))
        wall = time.perf_counter() - started
    return [r for group in groups for r in group], wall


def rss(url: str) -> float:
    return float(httpx.get(f"{url}/health", timeout=10).json().get("rss_mb") or float("nan"))


def bench_engine(run: Path, engine: str, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(run, engine, port, args.max_tokens, args.threads)
    try:
        served_engine = httpx.get(f"{url}/health", timeout=10).json()["engine"]
        reference = {}
        with httpx.Client(base_url=url, timeout=900) as client:
            for question in QUESTIONS:
                reply = client.post(
                    "/v1/chat/completions",
                    json={
                        "messages": [{"role": "user", "content": question}],
                        "max_tokens": args.max_tokens,
                    },
                )
                reply.raise_for_status()
                reference[question] = reply.json()["choices"][0]["message"]["content"]
        memory = [rss(url)]
        rounds = []
        for number in range(args.rounds):
            results, wall = asyncio.run(
                load_round(url, args.clients, args.requests, args.max_tokens)
            )
            memory.append(rss(url))
            ok = [r for r in results if r["status"] == 200]
            latencies = sorted(r["latency"] for r in ok)
            rounds.append(
                {
                    "requests": len(results),
                    "errors": len(results) - len(ok),
                    "matching": sum(r["text"] == reference[r["question"]] for r in ok),
                    "p50": statistics.median(latencies) if latencies else float("nan"),
                    "p95": latencies[max(0, round(0.95 * len(latencies)) - 1)]
                    if latencies
                    else float("nan"),
                    "tokens": sum(r["tokens"] for r in ok),
                    "wall": wall,
                }
            )
            r = rounds[-1]
            print(
                f"{served_engine} round {number + 1}: {r['matching']}/{r['requests']} match, p50 {r['p50']:.1f} s, "
                f"p95 {r['p95']:.1f} s, {r['tokens'] / wall:.1f} tok/s, rss {memory[-1]:.0f} MB",
                flush=True,
            )
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    return {"engine": served_engine, "rounds": rounds, "memory": memory}


def main() -> None:
    from medlora.machine import default_threads
    from medlora.serve.fast import llama_cpp_available

    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, default=None)
    parser.add_argument(
        "--engines", default="transformers,llama.cpp" if llama_cpp_available() else "transformers"
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="Server CPU threads (default: OMP_NUM_THREADS, else physical cores).",
    )
    args = parser.parse_args()
    args.threads = args.threads or default_threads()
    run = args.run or default_run()
    results = [bench_engine(run, engine, args) for engine in args.engines.split(",")]

    table = [
        "| engine | round | requests | errors | answers = single-request answer | p50 latency (s) | "
        "p95 latency (s) | completion tokens/s | server RSS after (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for number, r in enumerate(result["rounds"], 1):
            table.append(
                f"| {result['engine']} | {number} | {r['requests']} | {r['errors']} | {r['matching']}/{r['requests'] - r['errors']} "
                f"| {r['p50']:.1f} | {r['p95']:.1f} | {r['tokens'] / r['wall']:.1f} | {result['memory'][number]:.0f} |"
            )
    memory_lines = [
        f"- {r['engine']}: {r['memory'][0]:.0f} MB after the single requests → "
        + " → ".join(f"{m:.0f}" for m in r["memory"][1:])
        + " MB after each round"
        for r in results
    ]
    body = f"""## Serving under load: {args.clients} clients × {args.requests} requests (CPU)

Command: `python bench/load_test.py --run {run} --engines {args.engines} --clients {args.clients} --requests {args.requests} --max-tokens {args.max_tokens} --rounds {args.rounds} --threads {args.threads}`
({os.cpu_count()} CPU cores, {platform.machine()}; server `medlora serve {SPEC} --adapter RUN --no-base`
on 127.0.0.1, {len(QUESTIONS)} distinct questions, greedy, at most {args.max_tokens} new tokens each;
latency = request sent → whole answer received, queueing included).

{chr(10).join(table)}

Every answer is compared with the same question asked alone on the same server before the load.
Server memory (resident set, from `/health`):
{chr(10).join(memory_lines)}
"""
    print(body)
    update_section("serve-load", body)


if __name__ == "__main__":
    main()
