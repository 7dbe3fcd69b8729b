"""Pick and build the engine for `medlora serve` / `chat`: which weights, which names, which prompt.

`auto` takes llama.cpp when it is installed and the weights are (or can be made) GGUF, else plain
transformers. Every `--adapter [NAME=]RUN_DIR` becomes a served model named NAME (or after its
folder), with its run's chat template, system prompt and generation settings; unless
`with_base=False` the untouched base is served too, with the first adapter's template and settings,
so the web page can compare them on the same question.

On transformers the base is in memory once and every adapter is loaded on it by name
(serve/adapters.py); llama.cpp gets one base GGUF plus a GGUF LoRA per adapter (or a merged GGUF each).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlora import patches
from medlora.config import DEFAULT_SYSTEM_PROMPT, GenerationConfig
from medlora.errors import ConfigError, MedloraError
from medlora.export.common import DEFAULT_GGUF_TYPE
from medlora.serve.adapters import (
    AdapterHost,
    ModelSet,
    ServedModel,
    adapter_model,
    adapter_names,
    check_adapter_dir,
    check_shapes,
)
from medlora.serve.engine import Engine, Sampling

ENGINES = ("auto", "transformers", "llama.cpp", "vllm")
BATCHING = ("auto", "continuous", "static")
logger = logging.getLogger(__name__)


@dataclass
class Served:
    """The engine and the names it answers to, in the order /v1/models lists them."""

    engine: Engine
    models: dict[str, ServedModel]
    default_model: str
    base_id: str
    model_set: ModelSet | None = None  # transformers: the base and its adapters
    max_lora_rank: int = 64
    adapter_host: AdapterHost | None = None  # where hot-loaded adapters go (None: not hot-loadable)

    @property
    def tokenizer(self) -> Any:
        return self.models[self.default_model].tokenizer

    @property
    def adapters(self) -> list[str]:
        return [name for name, m in self.models.items() if m.is_adapter]

    @property
    def tuned(self) -> str | None:
        """The first adapter's name (the default model), None when serving a base alone."""
        return next(iter(self.adapters), None)

    @property
    def base(self) -> str | None:
        """The base model's name when it is served, else None."""
        return self.base_id if self.base_id in self.models else None


def sampling_for(
    model: ServedModel,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    top_logprobs: int | None = None,
) -> Sampling:
    """A request's sampling, with the model's repetition control (as eval and the demo use)."""
    return Sampling(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        repetition_penalty=model.generation.repetition_penalty,
        no_repeat_ngram_size=model.generation.no_repeat_ngram_size,
        top_logprobs=top_logprobs,
    )


def model_id(spec: str) -> str:
    """A short, stable name for a spec: the alias, the Hub id, or the folder/file name."""
    path = Path(spec)
    if path.exists():
        return path.resolve().stem if path.is_file() else path.resolve().name
    return spec


def _want_llama_cpp(engine: str) -> bool:
    from medlora.serve.llama_cpp import llama_cpp_available

    if engine == "llama.cpp":
        if not llama_cpp_available():
            raise ConfigError(
                "--engine llama.cpp needs llama-cpp-python: pip install -e '.[fast]' (or make fast)"
            )
        on, reason = patches.status("llama_cpp_lora_switch")
        if not on:
            raise ConfigError(
                f"--engine llama.cpp: {reason}; install the tested version (make fast) or use "
                "--engine transformers"
            )
        return True
    return engine == "auto" and llama_cpp_available() and patches.allowed("llama_cpp_lora_switch")


def _catalog(
    named: list[tuple[str, Path]], base_id: str, base_tokenizer: Any, with_base: bool
) -> dict[str, ServedModel]:
    """Adapters first (the first is the default), then the base with the first run's settings."""
    tokenizers: list[Any] = []
    models = {
        name: adapter_model(name, run, base_id, tokenizers, base_tokenizer) for name, run in named
    }
    first = next(iter(models.values()), None)
    if with_base or not models:
        models[base_id] = ServedModel(
            id=base_id,
            tokenizer=first.tokenizer if first else base_tokenizer,
            system_prompt=first.system_prompt if first else DEFAULT_SYSTEM_PROMPT,
            generation=first.generation if first else GenerationConfig(),
        )
    return models


def _llama_cpp_engine(
    spec: str,
    models: dict[str, ServedModel],
    gguf_type: str,
    adapters_as: str,
    batching: str,
    threads: int | None,
    n_ctx: int,
    max_batch: int,
) -> tuple[Engine, AdapterHost | None]:
    """`adapters_as`: "lora" = one base GGUF of `gguf_type` plus each adapter as a GGUF LoRA, one
    request at a time, or batched continuously with `batching` "continuous" (opt-in: a greedy
    answer can then part from the same request alone after another row ends, see
    serve/llama_cpp_continuous.py); hot loading goes through a `GgufLoraHost`.
    "merged" = each adapter merged into its own GGUF (the base: its shipped GGUF when it has one),
    one request at a time, no hot loading."""
    from medlora.export.gguf import base_gguf, cached_gguf_lora
    from medlora.export.run import cached_gguf
    from medlora.serve.llama_cpp import GgufLoraHost, LlamaCppEngine

    tokenizer = next(iter(models.values())).tokenizer
    if adapters_as == "merged":
        ggufs = {
            name: cached_gguf(m.run, spec, gguf_type) if m.run else base_gguf(spec, gguf_type)
            for name, m in models.items()
        }
        return LlamaCppEngine(ggufs, tokenizer, threads=threads, n_ctx=n_ctx), None
    loras = {name: cached_gguf_lora(m.run, spec) if m.run else None for name, m in models.items()}
    base = base_gguf(spec, gguf_type, shipped=False)
    if batching == "continuous" and patches.allowed("llama_cpp_continuous"):
        from medlora.serve.llama_cpp_continuous import LlamaCppContinuous

        fast = LlamaCppContinuous(base, loras, tokenizer, threads, n_ctx, max_batch)
    else:  # one request at a time: the baseline bench/load_test.py measures against
        fast = LlamaCppEngine.with_loras(base, loras, tokenizer, threads=threads, n_ctx=n_ctx)
    return fast, GgufLoraHost(fast, spec)


def _check_choices(engine: str, batching: str, llama_cpp_adapters: str, gguf_type: str) -> None:
    """One-line refusals for unknown option values, before anything loads."""
    from medlora.export.common import GGUF_TYPES

    if engine not in ENGINES or engine == "vllm":
        raise ConfigError(
            f"--engine {engine}: use one of auto, transformers, llama.cpp (vllm: see serve --help)"
        )
    if llama_cpp_adapters not in ("lora", "merged"):
        raise ConfigError(f"--llama-cpp-adapters {llama_cpp_adapters}: use lora or merged")
    if batching not in BATCHING:
        raise ConfigError(f"--batching {batching}: use one of {', '.join(BATCHING)}")
    if gguf_type not in GGUF_TYPES:  # checked here: under auto, a failed conversion falls back
        raise ConfigError(f"--gguf-type {gguf_type} is not one of {', '.join(GGUF_TYPES)}")


def build_engine(
    spec: str,
    adapters: str | os.PathLike[str] | Sequence[str] | None = None,
    *,
    engine: str = "auto",
    with_base: bool = True,
    max_batch: int = 8,
    threads: int | None = None,
    n_ctx: int = 2048,
    gguf_type: str = DEFAULT_GGUF_TYPE,
    batching: str = "auto",
    max_lora_rank: int = 64,
    llama_cpp_adapters: str = "lora",
) -> Served:
    """Load the weights once and return the engine with the served model names."""
    import torch

    from medlora.models import load_model, load_tokenizer

    _check_choices(engine, batching, llama_cpp_adapters, gguf_type)
    base_id = model_id(spec)
    named = adapter_names(adapters, base_id)
    for _, folder in named:
        check_adapter_dir(folder, max_rank=max_lora_rank)
    if threads:
        torch.set_num_threads(threads)

    if _want_llama_cpp(engine):
        try:
            models = _catalog(named, base_id, load_tokenizer(spec), with_base)
            fast, host = _llama_cpp_engine(
                spec, models, gguf_type, llama_cpp_adapters, batching, threads, n_ctx, max_batch
            )
            return Served(fast, models, next(iter(models)), base_id, None, max_lora_rank, host)
        except MedloraError as error:
            if engine != "auto":
                raise
            # auto: no converter, or a model llama.cpp cannot take; the fallback always works.
            logger.warning("llama.cpp engine unavailable (%s); using transformers", error)

    base, base_tokenizer = load_model(spec)
    base.to("cuda" if torch.cuda.is_available() else "cpu")
    base.eval()
    model_set = ModelSet(base)
    for adapter, folder in named:
        check_shapes(folder, base)  # the folder passed check_adapter_dir above
        model_set.load(adapter, folder)
    models = _catalog(named, base_id, base_tokenizer, with_base)
    first = next(iter(models.values()))
    hf = transformers_engine(model_set, first.tokenizer, max_batch, batching)  # auto: continuous
    return Served(hf, models, first.id, base_id, model_set, max_lora_rank, model_set)


def transformers_engine(model_set: ModelSet, tokenizer: Any, max_batch: int, batching: str) -> Any:
    """Continuous batching where the model's cache allows it, else static batching."""
    from medlora.serve.continuous import ContinuousEngine, NotContinuous
    from medlora.serve.engine import StaticEngine

    if batching in ("auto", "continuous") and patches.allowed("continuous_batching"):
        try:
            return ContinuousEngine(model_set, tokenizer, max_batch=max_batch)
        except NotContinuous as reason:
            logger.warning("continuous batching unavailable (%s); batching statically", reason)
    return StaticEngine(model_set, tokenizer, max_batch=max_batch)
