"""Pick and build the engine for `medlora serve` / `chat`: which weights, which names, which prompt.

`auto` takes llama.cpp when it is installed and the weights are (or can be made) GGUF, else plain
transformers. With `--adapter RUN` two models are served side by side: the fine-tuned one (named after
the run) and, unless `with_base=False`, the untouched base, both with the run's tokenizer, chat
template and system prompt, so the web page can compare them on the same question.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medlora.config import DEFAULT_SYSTEM_PROMPT, GenerationConfig
from medlora.errors import ConfigError, MedloraError
from medlora.evaluate.generate import run_generation_settings
from medlora.serve.engine import Engine, Sampling

ENGINES = ("auto", "transformers", "llama.cpp", "vllm")
logger = logging.getLogger(__name__)
_UNSET = object()


@dataclass
class Served:
    engine: Engine
    tuned: str | None  # model id of the fine-tuned model (None when serving a base alone)
    base: str | None  # model id of the base model (None when left out)
    system_prompt: str | None
    # The run's `generation:` section: request defaults and repetition control come from it.
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    @property
    def default_model(self) -> str:
        return self.tuned or str(self.base)

    def sampling(
        self,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Sampling:
        """A request's sampling, with the run's repetition control (as eval and the demo use)."""
        return Sampling(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            repetition_penalty=self.generation.repetition_penalty,
            no_repeat_ngram_size=self.generation.no_repeat_ngram_size,
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


def _want_llama_cpp(engine: str, spec: str) -> bool:
    from medlora.serve.fast import llama_cpp_available

    if engine == "llama.cpp":
        if not llama_cpp_available():
            raise ConfigError(
                "--engine llama.cpp needs llama-cpp-python: pip install -e '.[fast]' (or make fast)"
            )
        return True
    return engine == "auto" and llama_cpp_available()


def _build_llama_cpp(
    spec: str,
    run: Path | None,
    base_id: str,
    tuned_id: str | None,
    prompt: str | None,
    with_base: bool,
    threads: int | None,
    n_ctx: int,
    gguf_type: str,
) -> Served:
    from medlora.export import base_gguf, cached_gguf
    from medlora.models import load_tokenizer, prepare_tokenizer
    from medlora.serve.fast import LlamaCppEngine

    if run is not None:
        from transformers import AutoTokenizer

        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(run))
        ggufs = {str(tuned_id): cached_gguf(run, spec, gguf_type)}
        if with_base:
            ggufs[base_id] = base_gguf(spec, gguf_type)
    else:
        tokenizer = load_tokenizer(spec)
        ggufs = {base_id: base_gguf(spec, gguf_type)}
    fast = LlamaCppEngine(ggufs, tokenizer, threads=threads, n_ctx=n_ctx)
    return _served(fast, tuned_id, base_id, with_base, run, prompt)


def _served(
    engine: Engine,
    tuned_id: str | None,
    base_id: str,
    with_base: bool,
    run: Path | None,
    prompt: str | None,
) -> Served:
    """The served ids (the base only when asked for, or when there is no adapter) and the
    run's generation settings."""
    base = base_id if (with_base or run is None) else None
    return Served(engine, tuned_id, base, prompt, run_generation_settings(run))


def build_engine(
    spec: str,
    adapter: str | os.PathLike[str] | None = None,
    *,
    engine: str = "auto",
    with_base: bool = True,
    max_batch: int = 8,
    threads: int | None = None,
    n_ctx: int = 2048,
    gguf_type: str = "q8_0",
    system_prompt: Any = _UNSET,
    name: str | None = None,
    device: str | None = None,
) -> Served:
    """Load the weights once and return the engine with the served model ids."""
    import torch

    from medlora.models import load_model, load_with_adapter

    if engine not in ENGINES or engine == "vllm":
        raise ConfigError(
            f"--engine {engine}: use one of auto, transformers, llama.cpp (vllm: see serve --help)"
        )
    from medlora.export import GGUF_TYPES

    if gguf_type not in GGUF_TYPES:  # checked here: under auto, a failed conversion falls back
        raise ConfigError(f"--gguf-type {gguf_type} is not one of {', '.join(GGUF_TYPES)}")
    run = Path(adapter) if adapter else None
    base_id = model_id(spec)
    tuned_id = name or (run.resolve().name if run else None)
    if tuned_id is not None and tuned_id == base_id:
        tuned_id = f"{tuned_id}-lora"
    prompt = run_system_prompt(run) if system_prompt is _UNSET else system_prompt
    if threads:
        torch.set_num_threads(threads)

    if _want_llama_cpp(engine, spec):
        try:
            return _build_llama_cpp(
                spec, run, base_id, tuned_id, prompt, with_base, threads, n_ctx, gguf_type
            )
        except MedloraError as error:
            if engine != "auto":
                raise
            # auto: no converter, or a model llama.cpp cannot take; the fallback always works.
            logger.warning("llama.cpp engine unavailable (%s); using transformers", error)

    from medlora.serve.engine import TransformersEngine

    if run is not None:
        peft_model, tokenizer = load_with_adapter(spec, run)
        models = {str(tuned_id): peft_model.merge_and_unload()}
        if with_base:
            models[base_id] = load_model(spec)[0]
    else:
        model, tokenizer = load_model(spec)
        models = {base_id: model}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    for model in models.values():
        model.to(device)
    hf = TransformersEngine(models, tokenizer, max_batch=max_batch)
    return _served(hf, tuned_id, base_id, with_base, run, prompt)
