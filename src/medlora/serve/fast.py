"""The fast CPU engine: llama.cpp (through llama-cpp-python) on GGUF weights.

Optional (`pip install -e '.[fast]'` / `make fast`). Prompts are tokenized by the run's Hugging Face
tokenizer and handed to llama.cpp as token ids, so the chat template is the run's exact one, and
tokens are decoded by the same `Detokenizer` as the transformers engine.

One sequence at a time (`max_batch = 1`): llama-cpp-python's `Llama` holds one KV cache. Each job
starts from an empty cache, so an answer never depends on which request came before it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medlora.serve.engine import Job, RowTracker, stop_token_ids


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def default_threads() -> int:
    """Half the logical CPUs, as llama-cpp-python does: llama.cpp's threads spin at every barrier,
    so one more thread than free cores is many times slower (2 threads on a 2-core machine with one
    core busy: ≈1-4 tok/s, against ≈40 with 1 thread, measured here)."""
    return max(1, (os.cpu_count() or 2) // 2)


class LlamaCppEngine:
    name = "llama.cpp"
    max_batch = 1

    def __init__(
        self,
        ggufs: dict[str, Path],
        tokenizer: Any,
        threads: int | None = None,
        n_ctx: int = 2048,
    ) -> None:
        from llama_cpp import Llama

        threads = threads or default_threads()
        self.tokenizer = tokenizer
        self.stops = stop_token_ids(tokenizer)
        self.paths = dict(ggufs)
        self._llms = {
            name: Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=512,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
            for name, path in ggufs.items()
        }

    @property
    def models(self) -> list[str]:
        return list(self._llms)

    def run_batch(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            self._run(job)

    def _run(self, job: Job) -> None:
        llm = self._llms[job.model]
        sampling = job.sampling
        row = RowTracker(job, self.tokenizer, self.stops)
        if job.cancelled.is_set():
            row.finish("cancelled")
            return
        llm.reset()  # no prefix reuse: the same prompt always gets the same computation
        if sampling.seed is not None:
            llm.set_seed(sampling.seed)
        tokens = llm.generate(
            job.prompt_ids,
            temp=0.0 if sampling.greedy else sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p,
            top_k=0 if not sampling.greedy else 1,
            min_p=0.0,
            repeat_penalty=1.0,
            reset=True,
        )
        for token in tokens:
            if row.push(int(token)):
                break
        row.finish("length")
