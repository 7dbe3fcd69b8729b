"""Single-stream inference speed on the demo model: the model card's snippet vs medlora's engines.

    python bench/inference.py [--run RUN_DIR] [--new-tokens 128] [--repeats 3] [--threads N]
                              [--gguf-types q8_0,q4_0]

Measured in one run, on this machine, greedy, one request at a time, the same ≈200-token prompt
(the run's chat template and system prompt) for every engine:

1. the model card's `generate_medical_response()` as written: base + adapter loaded for each
   question, `tokenizer(question)` without the chat template, `generate(**inputs)` with no
   `max_new_tokens`, so generation stops at the library default of 20 tokens;
2. the snippet's style with a sane length: `generate` on the unmerged PEFT model (the baseline);
3. medlora's transformers path: merged weights, KV cache, streaming (`StaticEngine`);
4. medlora's fast engine: llama.cpp on the merged model as GGUF (`LlamaCppEngine`, flash attention),
   one row per `--gguf-types` entry (q8_0: serve's default; q4_0: faster prefill), when installed.

Every engine is loaded and warmed up (one generation) before it is timed. Time to first token =
request start → first streamed token (prefill included, loading excluded). Decode tokens/s =
tokens after the first ÷ time after the first. Median of `--repeats`. `--threads` (default:
OMP_NUM_THREADS, else the physical cores) applies to every engine. Greedy answers of the fast
engine are compared with the transformers path on several questions. Writes the `inference`
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gguf_types import gguf_type_table, heldout_examples  # noqa: E402
from _markdown import update_section  # noqa: E402
from _shared import QUESTIONS, SPEC, default_run  # noqa: E402

from medlora.machine import default_threads  # noqa: E402

CASE = (
    "I am 58 years old. For the past three months I have felt more thirsty than usual, I get up "
    "two or three times a night to urinate, and I have lost about four kilograms without trying. "
    "My father had type 2 diabetes and my mother has high blood pressure. I walk my dog every "
    "morning but otherwise I do not exercise much, and I work long hours at a desk. My doctor "
    "measured a fasting blood sugar of 7.4 mmol/L last week and asked me to come back for an HbA1c "
    "test. I also take ibuprofen for knee pain a few times a week. What could these symptoms "
    "mean, which tests confirm a diagnosis, and what treatment and lifestyle changes are usually "
    "recommended first?"
)
SHORT_QUESTION = "What are the symptoms of type 2 diabetes?"
AGREEMENT_QUESTIONS = QUESTIONS[:8]


def timed_stream(start: Callable[[Callable[[int], None]], Any]) -> dict[str, float]:
    """Run one generation; `start(on_token)` calls `on_token` per generated token."""
    stamps: list[float] = []
    t0 = time.perf_counter()
    start(lambda _token: stamps.append(time.perf_counter()))
    n = len(stamps)
    decode = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else float("nan")
    return {"ttft": stamps[0] - t0 if stamps else float("nan"), "tps": decode, "tokens": n}


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def engine_runner(engine: Any, model: str, ids: list[int], new_tokens: int) -> Callable[..., Any]:
    from medlora.serve.engine import Job, Sampling

    def start(on_token: Callable[[int], None]) -> None:
        count = [0]

        def sink(event: Any) -> None:
            if event.kind == "token":
                # Pieces are text; count generated tokens from the job instead (pieces can merge).
                while count[0] < len(job.completion_ids):
                    count[0] += 1
                    on_token(0)

        job = Job(model, ids, Sampling(max_new_tokens=new_tokens), sink=sink)
        engine.run_batch([job])
        start.last_text = job.text  # type: ignore[attr-defined]

    return start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--run", type=Path, default=None, help="Run directory (default: runs/demo)."
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for every engine (default: OMP_NUM_THREADS, else physical cores).",
    )
    parser.add_argument(
        "--gguf-types",
        default="q8_0,q6_K,q5_K_M,q5_0,q4_K_M,q4_0",
        help="Fast engine weights to measure, each a row (speed, answer loss, agreement).",
    )
    parser.add_argument(
        "--loss-examples",
        type=int,
        default=64,
        help="Test answers of the run scored under each GGUF type and the float model.",
    )
    args = parser.parse_args()
    args.threads = args.threads or default_threads()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    from medlora.evaluate.generate import generate_answers
    from medlora.evaluate.heldout import run_recipe
    from medlora.models import load_model, prepare_tokenizer
    from medlora.serve.adapters import ModelSet
    from medlora.serve.engine import StaticEngine
    from medlora.serve.llama_cpp import llama_cpp_available
    from medlora.serve.prompt import conversation_ids

    torch.set_num_threads(args.threads)
    run = args.run or default_run()
    system = run_recipe(run).data.system_prompt
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(run))
    ids = conversation_ids(tokenizer, [{"role": "user", "content": CASE}], system)
    n_new = args.new_tokens
    rows: dict[str, dict[str, float]] = {}
    notes: list[str] = []

    # 1. The card's snippet as written: reload per question, no chat template, no max_new_tokens.
    def generate_medical_response(question: str, chat_template: bool = False) -> str:
        model, card_tokenizer = load_model(SPEC)
        model = PeftModel.from_pretrained(model, run)
        text = question
        if chat_template:  # the fix a reader would try first; length is still the library default
            text = conversation_ids(tokenizer, [{"role": "user", "content": question}], system)
            text = tokenizer.decode(text)
        inputs = card_tokenizer(text, return_tensors="pt", add_special_tokens=False)
        outputs = model.generate(**inputs)
        new = outputs[0, inputs["input_ids"].shape[1] :].tolist()
        generate_medical_response.new_tokens = len(new)  # type: ignore[attr-defined]
        generate_medical_response.ended = bool(new) and new[-1] in stops  # type: ignore[attr-defined]
        return card_tokenizer.decode(new)

    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    t0 = time.perf_counter()
    card_answer = generate_medical_response(SHORT_QUESTION)
    card_seconds = time.perf_counter() - t0
    card_new = generate_medical_response.new_tokens  # type: ignore[attr-defined]
    card_ended = generate_medical_response.ended  # type: ignore[attr-defined]
    templated = generate_medical_response(SHORT_QUESTION, chat_template=True)
    templated_new = generate_medical_response.new_tokens  # type: ignore[attr-defined]
    templated_ended = generate_medical_response.ended  # type: ignore[attr-defined]
    print(
        f"card snippet as written: {card_seconds:.2f} s, {card_new} new tokens; "
        f"with the chat template {templated_new}",
        flush=True,
    )

    # 2. The snippet's style (unmerged PEFT generate) with a real length: the baseline.
    base, _ = load_model(SPEC)
    peft_model = PeftModel.from_pretrained(base, run).eval()
    prompt = torch.tensor([ids])

    class Stamps(BaseStreamer):
        def __init__(self, on_token: Callable[[int], None]) -> None:
            self.on_token, self.first = on_token, True

        def put(self, value: Any) -> None:
            if self.first:  # the prompt
                self.first = False
                return
            self.on_token(0)

        def end(self) -> None:
            pass

    def snippet(on_token: Callable[[int], None]) -> None:
        with torch.inference_mode():
            peft_model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=n_new,
                do_sample=False,
                streamer=Stamps(on_token),
                eos_token_id=sorted(
                    {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
                ),
            )

    def measure(name: str, start: Callable[..., Any]) -> None:
        start(lambda _t: None)  # warm-up
        rows[name] = median_of([timed_stream(start) for _ in range(args.repeats)])
        r = rows[name]
        print(
            f"{name}: first token {r['ttft']:.3f} s, {r['tps']:.1f} tok/s, {r['tokens']:.0f} tokens",
            flush=True,
        )

    measure("snippet style (unmerged PEFT generate)", snippet)

    # 3. medlora's transformers path: merged weights + KV cache + per-token streaming.
    merged = peft_model.merge_and_unload()
    hf_engine = StaticEngine(ModelSet(merged), tokenizer)
    hf_start = engine_runner(hf_engine, "tuned", ids, n_new)
    measure("medlora transformers (merged, KV cache)", hf_start)
    hf_answers = generate_answers(
        merged, tokenizer, AGREEMENT_QUESTIONS, system, n_new, batch_size=1
    )

    # 4. medlora's fast engine, once per GGUF type, and what each type costs in answer loss.
    agreements: dict[str, tuple[int, int, float]] = {}
    losses: dict[str, float] = {}
    if llama_cpp_available():
        from medlora.evaluate.gguf_loss import gguf_answer_loss
        from medlora.evaluate.loss import score_examples
        from medlora.export.gguf import base_gguf, cached_gguf_lora
        from medlora.export.run import cached_gguf
        from medlora.serve.llama_cpp import LlamaCppEngine

        lora = cached_gguf_lora(run, SPEC)

        examples = heldout_examples(run, tokenizer, args.loss_examples)
        losses["float32"] = score_examples(merged, examples, tokenizer.pad_token_id)["loss"]
        print(f"float32 answer loss on {len(examples)} test answers: {losses['float32']:.4f}")
        for gguf_type in args.gguf_types.split(","):
            gguf = cached_gguf(run, SPEC, gguf_type)
            losses[gguf_type] = gguf_answer_loss(gguf, examples, args.threads)["loss"]
            print(f"{gguf_type} answer loss: {losses[gguf_type]:.4f}", flush=True)
            fast = LlamaCppEngine({"tuned": gguf}, tokenizer, threads=args.threads)  # warmed up
            measure(
                f"medlora llama.cpp (merged {gguf_type} GGUF)",
                engine_runner(fast, "tuned", ids, n_new),
            )
            fast_answers = []
            for question in AGREEMENT_QUESTIONS:
                runner = engine_runner(
                    fast,
                    "tuned",
                    conversation_ids(tokenizer, [{"role": "user", "content": question}], system),
                    n_new,
                )
                runner(lambda _t: None)
                fast_answers.append(runner.last_text)  # type: ignore[attr-defined]
            del fast
            # The serving default: the base in this type plus the adapter as a GGUF LoRA.
            base = base_gguf(SPEC, gguf_type, shipped=False)
            with_lora = LlamaCppEngine.with_loras(
                base, {"tuned": lora}, tokenizer, threads=args.threads
            )
            measure(
                f"medlora llama.cpp ({gguf_type} base + GGUF LoRA)",
                engine_runner(with_lora, "tuned", ids, n_new),
            )
            del with_lora
            losses[f"{gguf_type} + LoRA"] = gguf_answer_loss(
                base, examples, args.threads, lora=lora
            )["loss"]
            pairs = list(zip(AGREEMENT_QUESTIONS, fast_answers, hf_answers, strict=True))
            same = sum(a == b for _, a, b in pairs)
            prefix = [common_prefix_words(a, b) for _, a, b in pairs]
            agreements[gguf_type] = (same, len(pairs), statistics.median(prefix))
            notes += [
                f"- {gguf_type}, *{q}* — first difference after {common_prefix_words(a, b)} words"
                for q, a, b in pairs
                if a != b
            ]
    else:
        notes.append("- llama-cpp-python is not installed (`make fast`): fast engine not measured.")

    baseline = rows["snippet style (unmerged PEFT generate)"]
    table = [
        "| path | first token (s) | decode tok/s | × snippet tok/s | targets (≤ 0.3× snippet's first token, ≥ 8× its tok/s) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, r in rows.items():
        ratio = r["tps"] / baseline["tps"]
        met = "met" if r["ttft"] <= 0.3 * baseline["ttft"] and ratio >= 8 else "not met"
        table.append(f"| {name} | {r['ttft']:.3f} | {r['tps']:.1f} | {ratio:.2f} | {met} |")
    load = os.getloadavg()[0]
    body = f"""## Inference: single stream on SmolLM2-135M-Instruct + LoRA (CPU)

Command: `python bench/inference.py --run {run} --new-tokens {n_new} --repeats {args.repeats} --threads {args.threads} --gguf-types {args.gguf_types}`
({os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}, {args.threads} threads,
greedy, prompt {len(ids)} tokens with the run's chat template, median of {args.repeats} after a warm-up;
1-minute load average at the end {load:.1f}: the machine is shared, and llama.cpp's spinning threads
collapse when they outnumber the free cores, so every engine runs with the same `--threads`).

{chr(10).join(table)}

The model card's `generate_medical_response()` **as written** (reloads base + adapter per question,
no chat template, `generate(**inputs)` without `max_new_tokens`) took {card_seconds:.2f} s for
*{SHORT_QUESTION}* and returned {card_new} new token(s): `{clean(card_answer)}`
({why(card_ended)}). With the chat template added but still no `max_new_tokens`, it returned
{templated_new} new tokens: `{clean(templated)}` ({why(templated_ended)}).
`medlora export --merge` writes a generation config with `max_new_tokens=512` and the end-of-turn
stop, so a plain `generate(**inputs)` on the export does not truncate.
"""
    if losses:
        body += gguf_type_table(rows, losses, baseline["tps"], len(examples))
    for gguf_type, (same, total, median_prefix) in agreements.items():
        body += f"""
Greedy answers, llama.cpp ({gguf_type} GGUF) vs the transformers path (float32), {n_new} new tokens:
**{same} of {total} identical**; where they differ, the median shared prefix is {median_prefix:.0f} words.
{rounding_note(gguf_type)}, so a near-tie between two tokens can flip, and the greedy
continuation diverges from there.
"""
    if notes:
        body += "\n" + "\n".join(notes) + "\n"
    print(body)
    update_section("inference", body)


def rounding_note(gguf_type: str) -> str:
    if gguf_type.startswith("q"):
        return (
            f"{gguf_type} rounds every weight to {gguf_type[1]} bits and llama.cpp quantizes "
            "activations to 8 bits for its dot products"
        )
    return f"{gguf_type} weights and llama.cpp's own kernels round differently from torch's float32"


def clean(text: str) -> str:
    return text.replace("\n", " ").replace("`", "'").strip()[:200] or "(nothing)"


def why(ended: bool) -> str:
    if ended:
        return "it ended its turn at once: an instruct model given no assistant header has nothing to answer"
    return "cut off by transformers' default length of 20 tokens"


def common_prefix_words(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split(), b.split(), strict=False):
        if x != y:
            break
        n += 1
    return n


if __name__ == "__main__":
    main()
