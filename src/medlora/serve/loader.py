"""Pick and build the engine for `medlora serve` / `chat`: which weights, which names, which prompt.

`auto` takes llama.cpp when it is installed and the weights are (or can be made) GGUF, else plain
transformers. Every `--adapter [NAME=]RUN_DIR` becomes a served model named NAME (or after its
folder), with its run's chat template, system prompt and generation settings; unless
`with_base=False` the untouched base is served too, with the first adapter's template and settings,
so the web page can compare them on the same question.

On transformers the base is in memory once and every adapter is loaded on it by name
(serve/adapters.py); llama.cpp gets one merged GGUF per adapter.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medlora import patches
from medlora.config import DEFAULT_SYSTEM_PROMPT
from medlora.errors import ConfigError, MedloraError
from medlora.evaluate.generate import run_generation_settings
from medlora.export.common import DEFAULT_GGUF_TYPE
from medlora.serve.adapters import (
    BASE_ADAPTER,
    AdapterHost,
    ModelSet,
    ServedModel,
    check_adapter_dir,
    check_name,
    check_shapes,
    parse_adapter_option,
)
from medlora.serve.engine import Engine, Sampling

ENGINES = ("auto", "transformers", "llama.cpp", "vllm")
BATCHING = ("auto", "continuous", "static")
logger = logging.getLogger(__name__)
_UNSET = object()

AdapterSpec = tuple[str | None, Path]  # (name or None: the folder's name, run directory)


@dataclass
class Served:
    """The engine and the names it answers to, in the order /v1/models lists them."""

    engine: Engine
    models: dict[str, ServedModel]
    default_model: str
    base_id: str
    model_set: ModelSet | None = None  # transformers: the base and its adapters
    max_lora_rank: int = 64
    adapter_host: AdapterHost | None = None  # where hot-loaded adapters go (default: model_set)

    def __post_init__(self) -> None:
        if self.adapter_host is None:
            self.adapter_host = self.model_set

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


def run_system_prompt(run_dir: Path | None) -> str | None:
    """The system prompt the run was trained with (recipe.yaml data.system_prompt)."""
    if run_dir is not None and (run_dir / "recipe.yaml").is_file():
        data = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}
        section = data.get("data") or {}
        if "system_prompt" in section:
            return section["system_prompt"]
    return DEFAULT_SYSTEM_PROMPT


def run_tokenizer(run: Path, fallback: Any) -> Any:
    """The run's own tokenizer (its chat template), or `fallback` when the run saved none."""
    from transformers import AutoTokenizer

    from medlora.models import prepare_tokenizer

    if not (run / "tokenizer_config.json").is_file():
        return fallback
    return prepare_tokenizer(AutoTokenizer.from_pretrained(run))


def adapter_model(
    name: str, run: Path, base_id: str, tokenizers: list[Any], fallback: Any
) -> ServedModel:
    """The served entry for an adapter; runs with the same chat template share one tokenizer."""
    tokenizer = run_tokenizer(run, fallback)
    for known in tokenizers:
        if known.chat_template == tokenizer.chat_template and len(known) == len(tokenizer):
            tokenizer = known
            break
    else:
        tokenizers.append(tokenizer)
    return ServedModel(
        id=name,
        tokenizer=tokenizer,
        system_prompt=run_system_prompt(run),
        generation=run_generation_settings(run),
        parent=base_id,
        run=run.resolve(),
        adapter=name,
    )


def normalize_adapters(
    adapters: str | os.PathLike[str] | Sequence[str | AdapterSpec] | None, name: str | None = None
) -> list[AdapterSpec]:
    """`--adapter` values (or one run directory) as (name, folder) pairs."""
    if adapters is None:
        return []
    if isinstance(adapters, str | os.PathLike):
        return [(name, Path(adapters))]
    specs = []
    for item in adapters:
        specs.append(parse_adapter_option(item) if isinstance(item, str) else item)
    return specs


def adapter_names(specs: list[AdapterSpec], base_id: str) -> list[tuple[str, Path]]:
    """Each adapter's served name: given, or its folder's; never the base's; never twice."""
    named = []
    for given, folder in specs:
        if not folder.is_dir():
            raise ConfigError(f"--adapter {folder}: no such run directory")
        name = given or folder.resolve().name
        if name == base_id:
            name = f"{name}-lora"
        check_name(name)
        if name in [n for n, _ in named]:
            raise ConfigError(f"--adapter: two adapters are named '{name}'; use NAME=RUN_DIR")
        named.append((name, folder))
    return named


def _want_llama_cpp(engine: str, spec: str) -> bool:
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
    named: list[tuple[str, Path]],
    base_id: str,
    base_tokenizer: Any,
    with_base: bool,
    prompt: Any,
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
            generation=first.generation if first else run_generation_settings(None),
        )
    if prompt is not _UNSET:  # the caller chose the system prompt (tests, bench)
        for model in models.values():
            model.system_prompt = prompt
    return models


def _build_llama_cpp(
    spec: str,
    named: list[tuple[str, Path]],
    base_id: str,
    with_base: bool,
    prompt: Any,
    threads: int | None,
    n_ctx: int,
    gguf_type: str,
    adapters_as: str,
    max_lora_rank: int,
    batching: str,
    max_batch: int,
) -> Served:
    """`adapters_as`: "lora" = one base GGUF of `gguf_type` plus each adapter as a GGUF LoRA, one
    request at a time, or batched continuously with `batching` "continuous" (opt-in: a greedy
    answer can then part from the same request alone after another row ends, see
    serve/llama_cpp_continuous.py);
    "merged" = each adapter merged into its own GGUF (the base: its shipped GGUF when it has one),
    one request at a time."""
    from medlora.export import base_gguf, cached_gguf, cached_gguf_lora
    from medlora.models import load_tokenizer
    from medlora.serve.llama_cpp import GgufLoraHost, LlamaCppEngine

    models = _catalog(named, base_id, load_tokenizer(spec), with_base, prompt)
    first = next(iter(models.values()))
    if adapters_as == "lora":
        loras = {
            name: cached_gguf_lora(m.run, spec) if m.run else None for name, m in models.items()
        }
        base = base_gguf(spec, gguf_type, shipped=False)
        if batching == "continuous" and patches.allowed("llama_cpp_continuous"):
            from medlora.serve.llama_cpp_continuous import LlamaCppContinuous

            fast = LlamaCppContinuous(base, loras, first.tokenizer, threads, n_ctx, max_batch)
        else:  # one request at a time: the baseline bench/load_test.py measures against
            fast = LlamaCppEngine.with_loras(
                base, loras, first.tokenizer, threads=threads, n_ctx=n_ctx
            )
        host = GgufLoraHost(fast, spec)
        return Served(fast, models, first.id, base_id, None, max_lora_rank, host)
    else:
        ggufs = {
            name: cached_gguf(m.run, spec, gguf_type) if m.run else base_gguf(spec, gguf_type)
            for name, m in models.items()
        }
        fast = LlamaCppEngine(ggufs, first.tokenizer, threads=threads, n_ctx=n_ctx)
    return Served(fast, models, first.id, base_id, None, max_lora_rank)


def build_engine(
    spec: str,
    adapters: str | os.PathLike[str] | Sequence[str | AdapterSpec] | None = None,
    *,
    engine: str = "auto",
    with_base: bool = True,
    max_batch: int = 8,
    threads: int | None = None,
    n_ctx: int = 2048,
    gguf_type: str = DEFAULT_GGUF_TYPE,
    system_prompt: Any = _UNSET,
    name: str | None = None,
    device: str | None = None,
    batching: str = "auto",
    max_lora_rank: int = 64,
    llama_cpp_adapters: str = "lora",
) -> Served:
    """Load the weights once and return the engine with the served model names."""
    import torch

    from medlora.models import load_model

    if engine not in ENGINES or engine == "vllm":
        raise ConfigError(
            f"--engine {engine}: use one of auto, transformers, llama.cpp (vllm: see serve --help)"
        )
    if llama_cpp_adapters not in ("lora", "merged"):
        raise ConfigError(f"--llama-cpp-adapters {llama_cpp_adapters}: use lora or merged")
    if batching not in BATCHING:
        raise ConfigError(f"--batching {batching}: use one of {', '.join(BATCHING)}")
    from medlora.export import GGUF_TYPES

    if gguf_type not in GGUF_TYPES:  # checked here: under auto, a failed conversion falls back
        raise ConfigError(f"--gguf-type {gguf_type} is not one of {', '.join(GGUF_TYPES)}")
    base_id = model_id(spec)
    named = adapter_names(normalize_adapters(adapters, name), base_id)
    for _, folder in named:
        check_adapter_dir(folder, max_rank=max_lora_rank)
    if threads:
        torch.set_num_threads(threads)

    if _want_llama_cpp(engine, spec):
        try:
            return _build_llama_cpp(
                spec,
                named,
                base_id,
                with_base,
                system_prompt,
                threads,
                n_ctx,
                gguf_type,
                llama_cpp_adapters,
                max_lora_rank,
                batching,
                max_batch,
            )
        except MedloraError as error:
            if engine != "auto":
                raise
            # auto: no converter, or a model llama.cpp cannot take; the fallback always works.
            logger.warning("llama.cpp engine unavailable (%s); using transformers", error)

    base, base_tokenizer = load_model(spec)
    base.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base.eval()
    model_set = ModelSet(base)
    for adapter, folder in named:
        check_shapes(folder, base)  # the folder passed check_adapter_dir above
        model_set.load(adapter, folder)
    models = _catalog(named, base_id, base_tokenizer, with_base, system_prompt)
    first = next(iter(models.values()))
    hf = transformers_engine(model_set, first.tokenizer, max_batch, batching)  # auto: continuous
    return Served(hf, models, first.id, base_id, model_set, max_lora_rank)


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


__all__ = [
    "BASE_ADAPTER",
    "Served",
    "ServedModel",
    "build_engine",
    "model_id",
    "run_system_prompt",
    "sampling_for",
]
