"""GGUF for llama.cpp: the converters and quantizer extracted from the llama-cpp-python sdist
(`make fast`), a base model's GGUF, and a run's adapter as a GGUF LoRA in the cache."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from medlora.errors import ModelError
from medlora.export.common import CONVERTER_TYPES, DEFAULT_GGUF_TYPE, GGUF_TYPES, ExportError
from medlora.export.lora_pad import pad_lora_rank
from medlora.export.merge import run_base_spec
from medlora.machine import default_threads
from medlora.models import cache_dir, local_folder, resolve

# What install_llama_cpp_tools extracts: the converters and the packages they import.
_LLAMA_CPP_TOOLS = (
    "convert_hf_to_gguf.py",
    "convert_lora_to_gguf.py",
    "conversion/",
    "gguf-py/",
    "LICENSE",
)


def llama_cpp_tools_dir() -> Path:
    """Where llama.cpp's converter scripts are (`MEDLORA_LLAMA_CPP_DIR`, else the medlora cache)."""
    env = os.environ.get("MEDLORA_LLAMA_CPP_DIR")
    return Path(env).expanduser() if env else cache_dir() / "llama.cpp"


def install_llama_cpp_tools(sdist: str | os.PathLike[str], dest: Path | None = None) -> Path:
    """Extract convert_hf_to_gguf.py and what it imports from a llama-cpp-python sdist (`make fast`)."""
    dest = dest or llama_cpp_tools_dir()
    scratch = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            _, _, inner = member.name.partition("/vendor/llama.cpp/")
            if inner.startswith(_LLAMA_CPP_TOOLS) and member.isfile():
                member.name = inner
                tar.extract(member, scratch, filter="data")
    if not (scratch / "convert_hf_to_gguf.py").is_file():
        raise ExportError(
            f"{sdist} holds no vendor/llama.cpp/convert_hf_to_gguf.py: give a llama-cpp-python sdist"
        )
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(scratch, dest)
    return dest


def _converter(name: str) -> Path:
    """One of llama.cpp's converter scripts, or an ExportError saying how to get it."""
    script = llama_cpp_tools_dir() / name
    if not script.is_file():
        raise ExportError(
            f"GGUF export needs llama.cpp's converter ({script} is missing): run `make fast`, "
            "or set MEDLORA_LLAMA_CPP_DIR to a llama.cpp checkout"
        )
    return script


def _run_converter(script: Path, args: list[str], outfile: Path, source: Path) -> None:
    """Run a converter script (a subprocess: it is a script) on `source`, writing `outfile`; its
    last line of output is the error when it fails."""
    command = [sys.executable, str(script), *args, "--outfile", str(outfile)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not outfile.is_file():
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ExportError(f"{script.name} failed on {source}: {last[0]}")


def convert_to_gguf(hf_folder: Path, outfile: Path, outtype: str = DEFAULT_GGUF_TYPE) -> Path:
    """Run llama.cpp's converter on a `save_pretrained` folder, then its quantizer for the types
    the converter does not write."""
    script = _converter("convert_hf_to_gguf.py")
    if outtype not in GGUF_TYPES:
        raise ExportError(f"--gguf-type {outtype} is not one of {', '.join(GGUF_TYPES)}")
    direct = outtype in CONVERTER_TYPES
    if not direct:
        _llama_cpp_for(outtype)  # fail before minutes of conversion
    tmp = outfile.with_name(outfile.name + (".tmp" if direct else ".f16.tmp"))
    args = [str(hf_folder), "--outtype", outtype if direct else "f16"]
    _run_converter(script, args, tmp, hf_folder)
    if not direct:
        try:
            tmp = quantize_gguf(tmp, outfile.with_name(outfile.name + ".tmp"), outtype)
        finally:
            outfile.with_name(outfile.name + ".f16.tmp").unlink(missing_ok=True)
    os.replace(tmp, outfile)
    return outfile


def convert_lora_to_gguf(adapter_dir: Path, base_folder: Path, outfile: Path) -> Path:
    """A PEFT adapter as a GGUF LoRA (llama.cpp's convert_lora_to_gguf.py, f32), which llama.cpp
    applies on top of any GGUF of the same base: one base in memory serves every adapter.

    A rank that is a multiple of 4 is written as rank + 1 with a zero component, the same update:
    llama.cpp then applies it batch-invariantly (export/lora_pad.py)."""
    script = _converter("convert_lora_to_gguf.py")
    tmp = outfile.with_name(outfile.name + ".tmp")
    with tempfile.TemporaryDirectory(dir=outfile.parent, prefix=".padded-") as padded:
        source = Path(padded) if pad_lora_rank(adapter_dir, Path(padded)) else adapter_dir
        args = [str(source), "--base", str(base_folder), "--outtype", "f32"]
        _run_converter(script, args, tmp, adapter_dir)
    os.replace(tmp, outfile)
    return outfile


def _llama_cpp_for(gguf_type: str) -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(
            f"--gguf-type {gguf_type} needs llama.cpp's quantizer: install llama-cpp-python "
            "(make fast), or use --gguf-type q8_0"
        ) from None
    return llama_cpp


def quantize_gguf(source: Path, target: Path, gguf_type: str) -> Path:
    """llama.cpp's quantizer (through llama-cpp-python) from an f16/f32 GGUF to `gguf_type`."""
    llama_cpp = _llama_cpp_for(gguf_type)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
    params.nthread = default_threads()
    # llama.cpp logs every tensor it quantizes; keep its errors only.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    status = llama_cpp.llama_model_quantize(
        str(source).encode(), str(target).encode(), ctypes.byref(params)
    )
    if status != 0 or not target.is_file():
        raise ExportError(f"llama.cpp could not quantize {source} to {gguf_type} (status {status})")
    return target


def adapter_fingerprint(run_dir: Path, base: str) -> str:
    """Identifies an adapter's weights + base, to cache its GGUF export."""
    digest = hashlib.sha256(base.encode())
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        path = run_dir / name
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def base_gguf(spec: str, gguf_type: str = DEFAULT_GGUF_TYPE, shipped: bool = True) -> Path:
    """A GGUF for a base model spec: the file itself for .gguf specs and the alias (`shipped`),
    else the model's float folder converted to `gguf_type` once into the cache."""
    source = resolve(spec)
    if shipped and source.kind in ("alias", "gguf"):
        return Path(source.location) / str(source.gguf_file)
    found = sorted(Path(source.location).glob("*.gguf")) if source.kind == "dir" else []
    if shipped and found:
        return found[0]
    folder = Path(local_folder(spec))
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    target = cache_dir() / "exports" / f"base-{folder.name}-{gguf_type}-{key}.gguf"
    if not target.is_file():
        if not (folder / "config.json").is_file():
            raise ModelError(f"cannot convert '{spec}' to GGUF: {folder} has no config.json")
        target.parent.mkdir(parents=True, exist_ok=True)
        convert_to_gguf(folder, target, gguf_type)
    return target


def cached_gguf_lora(run_dir: str | os.PathLike[str], base: str | None = None) -> Path:
    """The run's adapter as a GGUF LoRA, converted once into the cache; later calls reuse it."""
    run = Path(run_dir)
    spec = run_base_spec(run, base)
    # "lora-padded": ranks padded for batch invariance (export/lora_pad.py); earlier caches differ.
    name = f"{run.resolve().name}-lora-padded-{adapter_fingerprint(run, spec)}"
    target = cache_dir() / "exports" / name / "adapter.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        convert_lora_to_gguf(run, Path(local_folder(spec)), target)
    return target
