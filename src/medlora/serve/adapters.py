"""Many fine-tunes of one base: the served model names, adapter folders and their checks.

A server holds one base model in memory and loads each LoRA adapter on it by name (PEFT's
`load_adapter`), so three adapters cost about what one does. A request picks its model by the
OpenAI `model` field; a batch may mix adapters, because every forward call names the adapter of each
row (PEFT's `adapter_names`, with `__base__` for the untouched base).

Every adapter is named here, given at start-up (`adapter_names`) or hot-loaded (`check_name`), and
`check_adapter_dir` is the one gate its folder passes before it is loaded: it must sit under the
allowed root (symlinks resolved, so no escape), hold a PEFT LoRA adapter, stay within the rank limit
and fit the base's layer shapes. Each failure is an `AdapterError` with one line naming the folder
and the fix; a failed load leaves the server serving what it served before.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from medlora import patches
from medlora.config import GenerationConfig
from medlora.errors import ConfigError
from medlora.evaluate.heldout import run_recipe
from medlora.serve.stacked_lora import StackedLora, unsupported

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class AdapterError(ConfigError):
    """An adapter folder that cannot be served; `code` is the API's error code."""

    def __init__(self, message: str, code: str = "invalid_adapter", status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise AdapterError(
            f"adapter name '{name}': use letters, digits and . _ : - (at most 128 characters)"
        )
    if name == BASE_ADAPTER:
        raise AdapterError(f"adapter name '{name}' is reserved")
    return name


def parse_adapter_option(value: str) -> tuple[str | None, Path]:
    """`NAME=RUN_DIR` → (NAME, RUN_DIR); a bare `RUN_DIR` → (None, RUN_DIR): named after its folder."""
    name, sep, folder = value.partition("=")
    if sep and name and not Path(value).exists():
        return check_name(name), Path(folder)
    return None, Path(value)


def adapter_names(
    adapters: str | os.PathLike[str] | Sequence[str] | None, base_id: str
) -> list[tuple[str, Path]]:
    """`--adapter [NAME=]RUN_DIR` values (or one run directory) as (served name, folder) pairs:
    the name given, or the folder's; never the base's; never twice."""
    if adapters is None:
        adapters = []
    elif isinstance(adapters, str | os.PathLike):
        adapters = [os.fspath(adapters)]
    named: list[tuple[str, Path]] = []
    for given, folder in map(parse_adapter_option, adapters):
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


def adapter_rank(folder: Path) -> int:
    """The LoRA rank of an adapter folder (the largest, when ranks differ per layer)."""
    config = _adapter_config(folder)
    ranks = [int(config.get("r") or 0), *map(int, (config.get("rank_pattern") or {}).values())]
    return max(ranks)


def _adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(
            f"{folder} is not an adapter: it holds no adapter_config.json (a run folder from "
            "`medlora train` or a PEFT save_pretrained folder)",
            "not_an_adapter",
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(f"{path} is not readable JSON ({error})", "not_an_adapter") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: only LoRA adapters can be served", "not_an_adapter")
    return config


def resolve_under(root: Path, given: str | Path) -> Path:
    """`given` (relative to `root`, or absolute) with symlinks resolved; refused outside `root`."""
    base = root.resolve()
    path = Path(given)
    target = (path if path.is_absolute() else base / path).resolve()
    if target != base and not target.is_relative_to(base):
        raise AdapterError(
            f"{given} is outside the adapter root {base}: adapters load only from under "
            "--adapter-root",
            "path_not_allowed",
            403,
        )
    return target


def check_adapter_dir(folder: Path, *, max_rank: int, base_model: Any | None = None) -> Path:
    """The checks an adapter folder passes before PEFT loads it (see the module docstring)."""
    if not folder.exists():
        raise AdapterError(f"{folder} does not exist", "adapter_not_found", 404)
    if not folder.is_dir():
        raise AdapterError(f"{folder} is not a folder", "not_an_adapter")
    _adapter_config(folder)
    weights = [folder / "adapter_model.safetensors", folder / "adapter_model.bin"]
    if not any(w.is_file() for w in weights):
        raise AdapterError(
            f"{folder} holds adapter_config.json but no adapter_model.safetensors",
            "not_an_adapter",
        )
    rank = adapter_rank(folder)
    if rank > max_rank:
        raise AdapterError(
            f"{folder} has LoRA rank {rank}, over this server's --max-lora-rank {max_rank}",
            "rank_too_large",
        )
    if base_model is not None:
        check_shapes(folder, base_model)
    return folder


def check_shapes(folder: Path, base_model: Any) -> None:
    """Each LoRA matrix must match the base layer it adapts: an adapter of another base is refused
    here, before PEFT injects anything (checked for safetensors weights; PEFT checks the rest)."""
    from safetensors import safe_open

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return

    modules = dict(base_model.named_modules())
    with safe_open(str(weights), framework="pt") as tensors:
        for key in tensors.keys():  # noqa: SIM118  (safe_open has keys(), not iteration)
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            owner = key.split(".lora_")[0]
            layer = _find_layer(modules, owner)
            if layer is None:
                raise AdapterError(
                    f"{folder} adapts '{owner}', a layer this base model does not have: it was "
                    "trained on another base",
                    "incompatible_adapter",
                )
            shape = tensors.get_slice(key).get_shape()
            is_a = ".lora_A." in key  # A: (rank, in_features); B: (out_features, rank)
            got = shape[1] if is_a else shape[0]
            want = getattr(layer, "in_features" if is_a else "out_features", None)
            if want is not None and got != want:
                raise AdapterError(
                    f"{folder}: '{owner}' has {got} features in the adapter but {want} in this "
                    "base model: it was trained on another base",
                    "incompatible_adapter",
                )


def _find_layer(modules: dict[str, Any], owner: str) -> Any:
    """The base layer an adapter key names; PEFT's saved keys start with `base_model.model.`."""
    name = owner.removeprefix("base_model.model.")
    for candidate in (name, f"model.{name}", name.removeprefix("model.")):
        layer = modules.get(candidate)
        if layer is not None:
            return getattr(layer, "base_layer", layer)  # already wrapped by PEFT
    for key, layer in modules.items():
        if key.endswith("." + name) or key.endswith(name):
            return getattr(layer, "base_layer", layer)
    return None


@dataclass
class ServedModel:
    """One name a request can ask for: the base, or an adapter on it (`parent` = the base's id)."""

    id: str
    tokenizer: Any
    system_prompt: str | None
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    parent: str | None = None  # the base model's id, for an adapter
    run: Path | None = None  # the adapter folder
    adapter: str = BASE_ADAPTER  # the name PEFT knows it by

    @property
    def is_adapter(self) -> bool:
        return self.parent is not None


def adapter_model(
    name: str, run: Path, base_id: str, tokenizers: list[Any], fallback: Any
) -> ServedModel:
    """The served entry for an adapter, with its run's chat template, system prompt and generation
    settings; runs with the same chat template share one tokenizer (`tokenizers`, the known ones)."""
    from transformers import AutoTokenizer

    from medlora.models import prepare_tokenizer

    tokenizer = fallback
    if (run / "tokenizer_config.json").is_file():  # the run saved its own chat template
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(run))
    for known in tokenizers:
        if known.chat_template == tokenizer.chat_template and len(known) == len(tokenizer):
            tokenizer = known
            break
    else:
        tokenizers.append(tokenizer)
    recipe = run_recipe(run)
    return ServedModel(
        id=name,
        tokenizer=tokenizer,
        system_prompt=recipe.data.system_prompt,
        generation=recipe.generation,
        parent=base_id,
        run=run.resolve(),
        adapter=name,
    )


class AdapterHost(Protocol):
    """Where hot-loaded adapters go: `ModelSet` (transformers) or `llama_cpp.GgufLoraHost` (llama.cpp).

    `prepare` runs off the engine's thread (slow work: a conversion); `load` and `unload` run in it,
    between decode steps. `base` is a PyTorch module with the base's layers, for `check_shapes`."""

    @property
    def base(self) -> Any: ...

    def prepare(self, folder: Path) -> Path: ...

    def load(self, name: str, prepared: Path) -> None: ...

    def unload(self, name: str) -> None: ...


class ModelSet:
    """One base model in memory with LoRA adapters loaded on it by name.

    Every forward/generate call runs inside `rows(adapters)`, one adapter name per batch row.
    Mixed batches use `StackedLora` (serve/stacked_lora.py: all adapters of a layer in two matrix
    products, a forward hook per LoRA layer) when every adapter is a plain LoRA; otherwise PEFT's
    own mixed-batch path (`LoraLayer._mixed_batch_forward`), with the rows' names handed to each
    layer by a pre-forward hook rather than PEFT's `model(..., adapter_names=...)`, which walks all
    modules to add and remove hooks on every call (docs/benchmarks.md, "serve-mixed-lora").
    Relies on PEFT internals: LoRA layers' `forward(x, adapter_names=)` keyword (peft 0.21).
    Loading and unloading happen in the engine's thread between decode steps (the scheduler runs
    them there), so no forward pass ever sees an adapter half-loaded.
    """

    def __init__(self, base: Any) -> None:
        self.model = base  # becomes a PeftModel once an adapter is loaded
        self.stack_adapters = True  # False: always PEFT's path (bench/mixed_lora.py compares)
        self.base = base
        self.loaded: set[str] = set()
        self._names: list[str] | None = None  # the running batch's adapter per row (PEFT path)
        self._hooks: dict[int, Any] = {}  # id(LoRA layer) → its two hook handles
        self.stacked = StackedLora()
        self.uses_stacked = False  # False: PEFT's mixed-batch path (a variant such as DoRA)

    @property
    def is_peft(self) -> bool:
        return self.model is not self.base

    def prepare(self, folder: Path) -> Path:
        return folder  # PEFT loads the folder itself

    def load(self, name: str, folder: Path) -> None:
        from peft import PeftModel

        if self.loaded and not patches.allowed("peft_adapter_names"):
            raise AdapterError(
                f"{folder}: a second adapter needs peft's per-layer adapter_names, which this peft "
                "version was not tested with (medlora env); serve one adapter per server",
                "unsupported_adapter",
            )
        try:
            if not self.is_peft:
                self.model = PeftModel.from_pretrained(self.base, folder, adapter_name=name)
            else:
                self.model.load_adapter(str(folder), adapter_name=name)
        except Exception as error:  # PEFT's own checks: anything the pre-checks did not catch
            self._forget(name)
            raise AdapterError(
                f"{folder} could not be loaded on this base ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:200]})",
                "incompatible_adapter",
            ) from None
        self.model.eval()
        self.loaded.add(name)
        self._hook_lora_layers()
        self._restack()

    def unload(self, name: str) -> None:
        self._forget(name)
        self._restack()

    def _forget(self, name: str) -> None:
        self.loaded.discard(name)
        if self.is_peft and name in getattr(self.model, "peft_config", {}):
            if len(self.model.peft_config) == 1:
                # PEFT keeps at least one adapter: drop the wrapper and its layers instead.
                for handles in self._hooks.values():
                    for handle in handles:
                        handle.remove()
                self._hooks.clear()
                self.model = self.model.unload()
                self.base = self.model
            else:
                self.model.delete_adapter(name)

    @contextmanager
    def rows(self, adapters: list[str]) -> Iterator[None]:
        """Forward passes inside use `adapters[i]` for batch row i (BASE_ADAPTER: none)."""
        if self.uses_stacked:
            self.stacked.start(adapters)
        else:
            self._names = list(adapters) if self.is_peft else None
        try:
            yield
        finally:
            self._names = None
            self.stacked.stop()

    def _lora_layers(self) -> list[Any]:
        from peft.tuners.lora import LoraLayer

        if not self.is_peft:
            return []
        return [module for module in self.model.modules() if isinstance(module, LoraLayer)]

    def _hook_lora_layers(self) -> None:
        for module in self._lora_layers():
            if id(module) not in self._hooks:
                self._hooks[id(module)] = (
                    module.register_forward_pre_hook(self._pass_names, with_kwargs=True),
                    module.register_forward_hook(self.stacked.add_update),
                )

    def use_stacking(self, on: bool) -> None:
        """Stack the adapters (the default) or always take PEFT's mixed-batch path."""
        self.stack_adapters = on
        self._restack()

    def _restack(self) -> None:
        """After a load or unload: stack the adapters, or fall back to PEFT's path."""
        layers = self._lora_layers()
        reason = unsupported(layers, self.loaded) if layers else "no LoRA layer"
        if not self.stack_adapters:
            reason = "stacking turned off"
        elif reason is None and not patches.allowed("stacked_lora"):
            reason = "peft outside the versions stacked LoRA was tested with"
        self.uses_stacked = reason is None
        if self.uses_stacked:
            self.stacked.build(layers, self.loaded)
            return
        self.stacked.clear()
        if layers:
            logger.info("mixed-adapter batches use PEFT's path: %s", reason)

    def _pass_names(self, module: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        if self._names is not None:
            kwargs["adapter_names"] = self._names
        return args, kwargs

    def parameters(self) -> Any:
        return self.model.parameters()
