"""Load test: many clients, adapters mixed at random, continuous vs static batching, on one server.

    python bench/load_test.py [--engine transformers|llama.cpp] [--adapter NAME=RUN_DIR ...]
                              [--clients 32] [--requests 4]
                              [--long-tokens 64] [--short-tokens 8] [--short-share 0.25]
                              [--batchings continuous,static] [--max-batch 8] [--threads N]

1. Memory: a server with the first adapter alone (`--no-base`), then one with every adapter and the
   base; resident memory (from /health) after the same warm-up requests.
2. For each batching (each a fresh server with every adapter and the base): every distinct
   (model, question, length) of the load is first asked alone (the single-request greedy answer);
   then `--clients` clients send `--requests` requests each, the model picked at random among the
   adapters and the base, a `--short-share` of them short (`--short-tokens`) among long ones.
   Every answer must equal its single-request answer. Reports errors, lost requests, p50/p95
   latency, the p50 of the short requests (queued behind long ones), completion tokens/s.
With `--engine llama.cpp`, static batching is its one-request-at-a-time engine. Writes the
`serve-load` (or `serve-load-llama.cpp`) section of docs/benchmarks.md; ratios are between servers
of the same run.
Traffic goes to 127.0.0.1 only and every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
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

WARMUP = QUESTIONS[:4]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    adapters: list[str], extra: list[str], port: int, args: argparse.Namespace
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "medlora", "serve", SPEC, "--engine", args.engine]
    for adapter in adapters:
        command += ["--adapter", adapter]
    command += ["--port", str(port), "--max-queue", "512", "--timeout", "1800"]
    command += ["--max-new-tokens", str(args.long_tokens), "--threads", str(args.threads)]
    command += ["--max-batch", str(args.max_batch), *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
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


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


Request = tuple[str, str, int]  # model, question, max_tokens


async def ask(client: httpx.AsyncClient, request: Request) -> dict[str, Any]:
    model, question, max_tokens = request
    started = time.perf_counter()
    try:
        response = await client.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": question}],
                "max_tokens": max_tokens,
            },
        )
    except httpx.HTTPError as error:  # lost: no HTTP answer at all
        return {"request": request, "status": None, "error": repr(error)}
    latency = time.perf_counter() - started
    if response.status_code != 200:
        return {"request": request, "status": response.status_code, "latency": latency}
    body = response.json()
    return {
        "request": request,
        "status": 200,
        "latency": latency,
        "tokens": body["usage"]["completion_tokens"],
        "text": body["choices"][0]["message"]["content"],
    }


def plan(models: list[str], args: argparse.Namespace) -> list[list[Request]]:
    """Each client's requests: a random model, a random question, short or long (seeded)."""
    pick = random.Random(args.seed)
    clients = []
    for _ in range(args.clients):
        requests = []
        for _ in range(args.requests):
            short = pick.random() < args.short_share
            length = args.short_tokens if short else args.long_tokens
            requests.append((pick.choice(models), pick.choice(QUESTIONS), length))
        clients.append(requests)
    return clients


async def load_round(url: str, clients: list[list[Request]]) -> tuple[list[dict[str, Any]], float]:
    limits = httpx.Limits(max_connections=len(clients), max_keepalive_connections=len(clients))
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as client:

        async def one_client(requests: list[Request]) -> list[dict[str, Any]]:
            return [await ask(client, request) for request in requests]

        started = time.perf_counter()
        groups = await asyncio.gather(*(one_client(requests) for requests in clients))
        wall = time.perf_counter() - started
    return [r for group in groups for r in group], wall


def rss(url: str) -> float:
    return float(httpx.get(f"{url}/health", timeout=10).json().get("rss_mb") or float("nan"))


def singles(url: str, requests: set[Request]) -> dict[Request, str]:
    answers = {}
    with httpx.Client(base_url=url, timeout=900) as client:
        for model, question, max_tokens in sorted(requests):
            reply = client.post(
                "/v1/chat/completions",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": question}],
                    "max_tokens": max_tokens,
                },
            )
            reply.raise_for_status()
            answers[(model, question, max_tokens)] = reply.json()["choices"][0]["message"][
                "content"
            ]
    return answers


def memory_of(adapters: list[str], extra: list[str], args: argparse.Namespace) -> float:
    """Resident memory of a server after the same warm-up requests (one per served model)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(adapters, extra, port, args)
    try:
        models = httpx.get(f"{url}/health", timeout=10).json()["models"]
        singles(
            url, {(models[i % len(models)], q, args.short_tokens) for i, q in enumerate(WARMUP)}
        )
        return rss(url)
    finally:
        stop(process)


def bench_batching(
    adapters: list[str], batching: str, load: list[list[Request]], args: argparse.Namespace
) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(adapters, ["--batching", batching], port, args)
    try:
        reference = singles(url, {r for requests in load for r in requests})
        before = rss(url)
        results, wall = asyncio.run(load_round(url, load))
        after = rss(url)
    finally:
        stop(process)
    answered = [r for r in results if r["status"] == 200]
    latencies = sorted(r["latency"] for r in answered)
    short = sorted(r["latency"] for r in answered if r["request"][2] == args.short_tokens)
    row = {
        "batching": batching,
        "requests": len(results),
        "errors": sum(1 for r in results if r["status"] not in (200, None)),
        "lost": sum(1 for r in results if r["status"] is None),
        "matching": sum(r["text"] == reference[r["request"]] for r in answered),
        "answered": len(answered),
        "p50": statistics.median(latencies),
        "p95": latencies[max(0, round(0.95 * len(latencies)) - 1)],
        "short_p50": statistics.median(short) if short else float("nan"),
        "shorts": len(short),
        "tokens_per_s": sum(r["tokens"] for r in answered) / wall,
        "wall": wall,
        "rss_before": before,
        "rss_after": after,
    }
    print(row, flush=True)
    return row


def default_adapters() -> list[str]:
    """The demo run plus the other real runs of this checkout, when they exist."""
    found = [f"demo={default_run()}"]
    for name in ("demo-dpo", "quality"):
        if (Path("runs") / name / "adapter_config.json").is_file():
            found.append(f"{name}=runs/{name}")
    return found


def main() -> None:
    from medlora.machine import default_threads

    parser = argparse.ArgumentParser()
    parser.add_argument("--adapter", action="append", default=None, help="NAME=RUN_DIR")
    parser.add_argument("--engine", default="transformers", choices=["transformers", "llama.cpp"])
    parser.add_argument("--batchings", default="continuous,static")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--long-tokens", type=int, default=64)
    parser.add_argument("--short-tokens", type=int, default=8)
    parser.add_argument("--short-share", type=float, default=0.25)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    args.threads = args.threads or default_threads()
    adapters = args.adapter or default_adapters()
    names = [a.split("=", 1)[0] for a in adapters]

    one = memory_of(adapters[:1], ["--no-base"], args)
    every = memory_of(adapters, [], args)
    print(f"memory: one adapter {one:.0f} MB, {len(adapters)} adapters + base {every:.0f} MB")
    load = plan([*names, SPEC], args)
    rows = [bench_batching(adapters, b, load, args) for b in args.batchings.split(",")]

    table = [
        "| batching | requests | errors | lost | answers = single-request answer | p50 latency (s) "
        "| p95 latency (s) | short requests' p50 (s) | completion tokens/s | server RSS before → "
        "after (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['batching']} | {r['requests']} | {r['errors']} | {r['lost']} "
            f"| {r['matching']}/{r['answered']} | {r['p50']:.1f} | {r['p95']:.1f} "
            f"| {r['short_p50']:.1f} (n = {r['shorts']}) | {r['tokens_per_s']:.1f} "
            f"| {r['rss_before']:.0f} → {r['rss_after']:.0f} |"
        )
    ratios = []
    by = {r["batching"]: r for r in rows}
    if "continuous" in by and "static" in by:
        c, s = by["continuous"], by["static"]
        ratios = [
            f"- completion tokens/s, continuous ÷ static: **{c['tokens_per_s'] / s['tokens_per_s']:.2f}×**",
            f"- short requests' p50 latency, continuous ÷ static: **{c['short_p50'] / s['short_p50']:.2f}×**",
        ]
    cpu = "AVX-512" if "avx512f" in Path("/proc/cpuinfo").read_text() else "AVX2"
    engine = "" if args.engine == "transformers" else f" --engine {args.engine}"
    served = (
        "every adapter"
        if args.engine == "transformers"
        else "one q8_0 base GGUF and every adapter as a GGUF LoRA (static: one request at a time)"
    )
    body = f"""## Serving under load: {len(adapters)} adapters and their base on one server ({args.engine}, CPU)

Command: `python bench/load_test.py{engine} {" ".join("--adapter " + a for a in adapters)} --clients {args.clients} --requests {args.requests} --long-tokens {args.long_tokens} --short-tokens {args.short_tokens} --short-share {args.short_share} --max-batch {args.max_batch} --threads {args.threads}`
({os.cpu_count()} CPU cores, {platform.machine()} with {cpu}; `medlora serve {SPEC} --engine {args.engine}`
with {served} on 127.0.0.1; each request picks one of {len(names) + 1} models ({", ".join(names)}, base) and
a question at random (seed {args.seed}), {args.short_share:.0%} of them short ({args.short_tokens} new tokens) among
long ones ({args.long_tokens}); greedy; latency = request sent → whole answer received, queueing included).

Memory (resident set after the same warm-up requests): one adapter alone {one:.0f} MB; {len(adapters)} adapters
and the base {every:.0f} MB (**{every / one:.2f}×**).

{chr(10).join(table)}

{chr(10).join(ratios)}

Every answer is compared with the same request (model, question, length) sent alone to the same
server before the load.
"""
    print(body)
    update_section(
        "serve-load" if args.engine == "transformers" else f"serve-load-{args.engine}", body
    )


if __name__ == "__main__":
    main()
