"""Training: `train()` in loop.py reads top to bottom; the Trainer subclass, its callbacks, the
memory budget, preference tuning (DPO / ORPO) and the CPU/GPU kernels live beside it."""

from medlora.train.loop import train
from medlora.train.run_files import TrainResult, load_or_prepare_splits

__all__ = ["TrainResult", "load_or_prepare_splits", "train"]
