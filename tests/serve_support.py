"""Shared by the serve/export/chat tests: a tiny trained run and a real uvicorn server in a thread."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

from helpers import tiny_records, write_prepared

from medlora.config import recipe_from_dict
from medlora.train import train

QUICK = [
    "train.lr=0.01",
    "train.batch_size=4",
    "train.grad_accum=1",
    "train.epochs=2",
    "train.warmup_ratio=0.0",
    "lora.r=8",
    "lora.alpha=16",
    "lora.dropout=0.0",
    "lora.target_modules=all-linear",
]


_TRAINED: dict[str, Path] = {}


def train_tiny_run(root: Path, model_dir: Path) -> Path:
    """A real run directory (adapter, tokenizer, recipe with the default system prompt).

    Trained once per session and model, then copied, so each module gets its own folder.
    """
    key = str(model_dir)
    if key not in _TRAINED:
        first = root / ".trained"
        records = tiny_records()
        prepared = write_prepared(first / "prepared", records[:15], records[15:20], records[15:20])
        recipe = recipe_from_dict({"model": {"name": str(model_dir)}}, QUICK)
        train(recipe, first / "run", prepared_dir=prepared)
        _TRAINED[key] = first / "run"
    shutil.copytree(_TRAINED[key], root / "run")
    return root / "run"


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def variant_adapter(run: Path, dest: Path, seed: int) -> Path:
    """A copy of `run` whose LoRA weights are perturbed: another adapter of the same base, whose
    answers differ (as a run on other data would)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints"))
    path = dest / "adapter_model.safetensors"
    tensors = load_file(str(path))
    generator = torch.Generator().manual_seed(seed)
    for key, value in tensors.items():
        if ".lora_B." in key:
            noise = torch.randn(value.shape, generator=generator) * 0.5
            tensors[key] = value + noise
    save_file(tensors, str(path))
    return dest


def foreign_adapter(run: Path, dest: Path) -> Path:
    """A copy of `run` shaped for another base: every LoRA A matrix reads 8 more features."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints"))
    path = dest / "adapter_model.safetensors"
    tensors = load_file(str(path))
    for key, value in list(tensors.items()):
        if ".lora_A." in key:
            tensors[key] = torch.zeros(value.shape[0], value.shape[1] + 8)
    save_file(tensors, str(path))
    return dest
