"""The fast CPU engine: llama.cpp (through llama-cpp-python) on GGUF weights.

Optional (`pip install -e '.[fast]'` / `make fast`). Prompts are tokenized by the run's Hugging Face
tokenizer and handed to llama.cpp as token ids, so the chat template is the run's exact one, and
tokens are decoded by the same `Detokenizer` as the transformers engine.

Two ways to serve adapters (`LlamaCppEngine.with_loras` / `LlamaCppEngine(ggufs)`):
- one base GGUF in memory plus each adapter as a GGUF LoRA, switched per request (the default);
- one merged GGUF per served model (`--llama-cpp-adapters merged`).

One sequence at a time (`max_batch = 1`): llama-cpp-python's `Llama` holds one KV cache. Each job
starts from an empty cache, so an answer never depends on which request came before it. Many
sequences at once, opt-in: serve/llama_cpp_continuous.py. Tokens are picked from llama.cpp's logits with
transformers' rules (serve/token_rules.py), as in the continuous engine and the transformers
engines, not by llama.cpp's sampler chain (its repetition penalty sees only the last 64 tokens).

Switching LoRA adapters uses llama-cpp-python's low-level `llama_adapter_lora_init` /
`llama_set_adapters_lora` on the `Llama` object's private `_model.model` and `_ctx.ctx` handles
(tested with llama-cpp-python 0.3.36): its public API takes one adapter at load time only. The
logits are read with `llama_get_logits_ith` on the same `_ctx.ctx`: `Llama.eval` keeps them only
with `logits_all`, which would hold a row of logits per context token.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medlora.errors import MedloraError, ModelError
from medlora.evaluate.generate import stop_token_ids
from medlora.machine import default_threads
from medlora.serve.adapters import AdapterError
from medlora.serve.engine import Job, RowTracker
from medlora.serve.token_rules import TokenRules


def load_lora(model: Any, path: Path | None) -> Any:
    """The GGUF LoRA `path` loaded onto the llama.cpp model `model` (None: no adapter)."""
    if path is None:
        return None
    import llama_cpp

    adapter = llama_cpp.llama_adapter_lora_init(model, str(path).encode())
    if not adapter:
        raise ModelError(f"llama.cpp could not load the GGUF LoRA {path} onto its base")
    return adapter


def set_lora(ctx: Any, adapter: Any) -> None:
    """Apply the LoRA `adapter` (None: none) to the llama.cpp context `ctx` at scale 1."""
    import ctypes

    import llama_cpp

    if adapter is None:
        status = llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
    else:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(1.0)
        status = llama_cpp.llama_set_adapters_lora(ctx, adapters, 1, scales)
    if status != 0:
        raise ModelError(f"llama.cpp could not switch LoRA adapters (status {status})")


def last_logits(llm: Any) -> np.ndarray:
    """The logits after the last token `llm` (a llama-cpp-python `Llama`) evaluated: a view of
    llama.cpp's buffer, valid until its next decode."""
    import llama_cpp

    pointer = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),))


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


# Prompt tokens per llama_decode call: any prompt up to 512 tokens (the 200-token benchmark question
# included) is prefilled in one batch, one set of matmuls over all its tokens.
PREFILL_BATCH = 512
WARM_PROMPT = "What are the symptoms of asthma? " * 4


class LlamaCppEngine:
    name = "llama.cpp"
    batching = "single"
    max_batch = 1
    supports_logprobs = True

    def __init__(
        self,
        ggufs: dict[str, Path],
        tokenizer: Any,
        threads: int | None = None,
        n_ctx: int = 2048,
        flash_attn: bool = True,
        loras: dict[str, Path | None] | None = None,
    ) -> None:
        """`ggufs`: one GGUF per served model. With `loras` (served name -> GGUF LoRA, None for
        the base itself), `ggufs` holds the one base GGUF that every adapter is applied to."""
        from llama_cpp import Llama

        self.threads = threads or default_threads()
        self.tokenizer = tokenizer
        self.stops = set(stop_token_ids(tokenizer))
        self.paths = dict(ggufs)
        self._llms = {
            name: Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=PREFILL_BATCH,
                n_ubatch=PREFILL_BATCH,
                n_threads=self.threads,
                n_threads_batch=self.threads,
                # Fused attention: faster prefill and decode on CPU (docs/benchmarks.md, "inference").
                flash_attn=flash_attn,
                verbose=False,
            )
            for name, path in ggufs.items()
        }
        # Served name -> (the Llama that answers it, its LoRA adapter handle or None).
        self._routes: dict[str, tuple[Any, Any]] = {n: (llm, None) for n, llm in self._llms.items()}
        self.lora_base: Any = None  # the one base Llama that GGUF LoRAs apply to (lora mode)
        if loras is not None:
            (self.lora_base,) = self._llms.values()
            self._routes = {
                name: (self.lora_base, self._load_lora(self.lora_base, path))
                for name, path in loras.items()
            }
        for llm in self._llms.values():
            self._warm(llm)

    @classmethod
    def with_loras(
        cls, base: Path, loras: dict[str, Path | None], tokenizer: Any, **kwargs: Any
    ) -> LlamaCppEngine:
        return cls({"base": base}, tokenizer, loras=loras, **kwargs)

    def _load_lora(self, llm: Any, path: Path | None) -> Any:
        return load_lora(llm._model.model, path)

    def add_lora(self, name: str, path: Path) -> None:
        """Serve `name` as the GGUF LoRA `path` on the base (runs in the engine's thread)."""
        if self.lora_base is None:
            raise ModelError("adapters can be added only when serving GGUF LoRAs on one base")
        self._routes[name] = (self.lora_base, self._load_lora(self.lora_base, path))

    def remove_lora(self, name: str) -> None:
        """Stop serving `name` and free its adapter (runs in the engine's thread, between jobs)."""
        import llama_cpp

        llm, adapter = self._routes.pop(name)
        if adapter is not None:
            self._use(llm, None)  # the context must not keep a pointer to the freed adapter
            llama_cpp.llama_adapter_lora_free(adapter)

    @staticmethod
    def _use(llm: Any, adapter: Any) -> None:
        """Apply `adapter` (None: no adapter) to `llm`'s context for the next request."""
        set_lora(llm._ctx.ctx, adapter)

    def _warm(self, llm: Any) -> None:
        """Prefill a short prompt and decode two tokens at load time, so the first request does not
        pay for faulting in the memory-mapped weights and the first use of each kernel."""
        prompt = self.tokenizer.encode(WARM_PROMPT, add_special_tokens=False) or [0]
        llm.reset()
        llm.eval(prompt)
        for _ in range(2):
            llm.eval([int(np.argmax(last_logits(llm)))])
        llm.reset()

    @property
    def models(self) -> list[str]:
        return list(self._routes)

    def run_batch(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            self._run(job)

    def _run(self, job: Job) -> None:
        llm, adapter = self._routes[job.model]
        row = RowTracker(job, self.tokenizer, self.stops)
        if job.cancelled.is_set():
            row.finish("cancelled")
            return
        self._use(llm, adapter)
        llm.reset()  # no prefix reuse: the same prompt always gets the same computation
        ids, rules = list(job.prompt_ids), TokenRules(job.sampling)
        llm.eval(ids)  # the prompt in pieces of PREFILL_BATCH; logits of its last token
        while True:
            token, logprob = rules.next_token(last_logits(llm), ids)
            ids.append(token)
            if row.push(token, logprob):
                break
            llm.eval([token])
        row.finish("length")


class GgufLoraHost:
    """Hot load and unload for the llama.cpp engine serving GGUF LoRAs on one base GGUF.

    The same three steps as the transformers engine's `ModelSet`: `prepare` (off the engine's
    thread: here the conversion to a GGUF LoRA, cached like every other), then `load` / `unload` in
    the engine's thread between requests. `base` is the base model's layer structure on PyTorch's
    meta device, no weights: `check_shapes` refuses an adapter of another base before conversion.
    """

    def __init__(self, engine: Any, spec: str) -> None:
        """`engine`: LlamaCppEngine with LoRAs, or llama_cpp_continuous.LlamaCppContinuous."""
        self.engine = engine
        self.spec = spec
        self._base: Any = None

    @property
    def base(self) -> Any:
        if self._base is None:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            from medlora.models import local_folder

            config = AutoConfig.from_pretrained(local_folder(self.spec))
            with torch.device("meta"):
                self._base = AutoModelForCausalLM.from_config(config)
        return self._base

    def prepare(self, folder: Path) -> Path:
        from medlora.export.gguf import cached_gguf_lora

        try:
            return cached_gguf_lora(folder, self.spec)
        except MedloraError as error:
            raise AdapterError(str(error), "incompatible_adapter") from None

    def load(self, name: str, gguf: Path) -> None:
        try:
            self.engine.add_lora(name, gguf)
        except ModelError as error:
            raise AdapterError(str(error), "incompatible_adapter") from None

    def unload(self, name: str) -> None:
        self.engine.remove_lora(name)
