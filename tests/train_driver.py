"""Runs `medlora.train.train` in a child process (for kill-and-resume and torchrun tests).

Usage: python train_driver.py CONFIG.json. The config names the model dir, the prepared data,
the run dir, recipe overrides, `resume`, and `step_sleep` (seconds slept per forward pass, so a
test can kill the process mid-run).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from medlora.config import recipe_from_dict
from medlora.models import load_model
from medlora.train import train


def trace_writes(run_dir: str, log: Path) -> None:
    """Append every file this process opens for writing under `run_dir` to `log` (audit hook)."""
    root = str(Path(run_dir).resolve())
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def hook(event: str, args: tuple) -> None:
        if event != "open" or not isinstance(args[0], str | Path):
            return
        path, mode, flags = str(Path(args[0]).resolve()), args[1], args[2]
        wants_write = any(c in mode for c in "wax+") if isinstance(mode, str) else flags & writing
        if wants_write and path.startswith(root) and not path.startswith(str(log)):
            with open(log, "a") as out:
                out.write(os.path.relpath(path, root) + "\n")

    sys.addaudithook(hook)


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    if config.get("trace_writes"):
        rank = os.environ.get("RANK", "0")
        trace_writes(config["run_dir"], Path(config["trace_writes"]) / f"writes-rank{rank}.txt")
    torch.set_num_threads(1)
    recipe = recipe_from_dict({"model": {"name": config["model"]}}, config["overrides"])
    model, tokenizer = load_model(config["model"])
    if config.get("step_sleep"):
        model.register_forward_pre_hook(lambda *_: time.sleep(config["step_sleep"]))
    result = train(
        recipe,
        config["run_dir"],
        prepared_dir=config["prepared"],
        resume=config.get("resume", False),
        model_and_tokenizer=(model, tokenizer),
    )
    print(json.dumps({"steps": result.steps}))


if __name__ == "__main__":
    main()
