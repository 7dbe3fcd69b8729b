"""Runs `medlora.train.train` in a child process (for kill-and-resume and torchrun tests).

Usage: python train_driver.py CONFIG.json. The config names the model dir, the prepared data,
the run dir, recipe overrides, `resume`, and `step_sleep` (seconds slept per forward pass, so a
test can kill the process mid-run).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from medlora.config import recipe_from_dict
from medlora.models import load_model
from medlora.train import train


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
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
