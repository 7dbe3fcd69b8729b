"""Single-stream inference speed on the demo model: the model card's snippet vs medlora's engines.

    python bench/inference.py [--run RUN_DIR] [--new-tokens 128] [--repeats 3]

Measured in one run, on this machine, greedy, one request at a time, the same ≈200-token prompt
(the run's chat template and system prompt) for every engine:

1. the model card's `generate_medical_response()` as written: base + adapter loaded for each
   question, `tokenizer(question)` without the chat template, `generate(**inputs)` with no
   `max_new_tokens`, so generation stops at the library default of 20 tokens;
2. the snippet's style with a sane length: `generate` on the unmerged PEFT model (the baseline);
3. medlora's transformers path: merged weights, KV cache, streaming (`TransformersEngine`);
4. medlora's fast engine: llama.cpp on the merged model as GGUF (`LlamaCppEngine`), when installed.

Time to first token = request start → first streamed token (prefill included). Decode tokens/s =
tokens after the first ÷ time after the first. Median of `--repeats`. Greedy answers of the fast
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

from _markdown import update_section  # noqa: E402

SPEC = "smollm2-135m-instruct"
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
AGREEMENT_QUESTIONS = [
    "What are the symptoms of asthma?",
    "How is high blood pressure treated?",
    "What causes iron deficiency anemia?",
    "How can I prevent the flu?",
    "What are the early signs of Lyme disease?",
    "Who is at risk for osteoporosis?",
    "What is the outlook for people with migraine?",
    "How is strep throat diagnosed?",
]


def default_run() -> Path:
    """runs/demo when `make demo` has run, else a short real run (10 steps) made once for the bench."""
    demo = Path("runs/demo")
    if (demo / "adapter_config.json").is_file():
        return demo
    run = Path("runs/bench-inference")
    if not (run / "adapter_config.json").is_file():
        from medlora.cli import BUNDLED_RECIPES
        from medlora.config import load_recipe
        from medlora.train import train

        print("no runs/demo: training a 10-step run into runs/bench-inference", flush=True)
        root = Path(__file__).resolve().parents[1]
        os.environ.setdefault("MEDLORA_DATA_DIR", str(root.parent / "shared" / "datasets"))
        overrides = ["train.max_steps=10", "data.max_train_examples=80", "train.eval_steps=0"]
        train(load_recipe(BUNDLED_RECIPES / "smollm2-135m-cpu.yaml", overrides), run)
    return run


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
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for every engine.")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    from medlora.evaluate.generate import generate_answers
    from medlora.models import load_model, prepare_tokenizer
    from medlora.serve.engine import TransformersEngine
    from medlora.serve.fast import llama_cpp_available
    from medlora.serve.loader import run_system_prompt
    from medlora.serve.prompt import conversation_ids

    torch.set_num_threads(args.threads)
    run = args.run or default_run()
    system = run_system_prompt(run)
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
    hf_engine = TransformersEngine({"tuned": merged}, tokenizer)
    hf_start = engine_runner(hf_engine, "tuned", ids, n_new)
    measure("medlora transformers (merged, KV cache)", hf_start)
    hf_answers = generate_answers(
        merged, tokenizer, AGREEMENT_QUESTIONS, system, n_new, batch_size=1
    )

    # 4. medlora's fast engine.
    agreement = None
    if llama_cpp_available():
        from medlora.export import cached_gguf
        from medlora.serve.fast import LlamaCppEngine

        gguf = cached_gguf(run, SPEC)
        fast = LlamaCppEngine({"tuned": gguf}, tokenizer, threads=args.threads)
        measure(
            "medlora llama.cpp (merged q8_0 GGUF)",
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
        same = sum(a == b for a, b in zip(fast_answers, hf_answers, strict=True))
        prefix = [common_prefix_words(a, b) for a, b in zip(fast_answers, hf_answers, strict=True)]
        agreement = (same, len(AGREEMENT_QUESTIONS), statistics.median(prefix))
        for q, a, b in zip(AGREEMENT_QUESTIONS, fast_answers, hf_answers, strict=True):
            if a != b:
                notes.append(f"- *{q}* — first difference after {common_prefix_words(a, b)} words")
    else:
        notes.append("- llama-cpp-python is not installed (`make fast`): fast engine not measured.")

    baseline = rows["snippet style (unmerged PEFT generate)"]
    table = ["| path | first token (s) | decode tok/s | × snippet tok/s |", "|---|---:|---:|---:|"]
    for name, r in rows.items():
        table.append(
            f"| {name} | {r['ttft']:.3f} | {r['tps']:.1f} | {r['tps'] / baseline['tps']:.2f} |"
        )
    load = os.getloadavg()[0]
    body = f"""## Inference: single stream on SmolLM2-135M-Instruct + LoRA (CPU)

Command: `python bench/inference.py --run {run} --new-tokens {n_new} --repeats {args.repeats}`
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
    if agreement:
        same, total, median_prefix = agreement
        body += f"""
Greedy answers, llama.cpp (q8_0 GGUF) vs the transformers path (float32), {n_new} new tokens:
**{same} of {total} identical**; where they differ, the median shared prefix is {median_prefix:.0f} words.
q8_0 rounds every weight to 8 bits and llama.cpp quantizes activations for its dot products, so
a near-tie between two tokens can flip, and the greedy continuation diverges from there.
"""
    if notes:
        body += "\n" + "\n".join(notes) + "\n"
    print(body)
    update_section("inference", body)


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
