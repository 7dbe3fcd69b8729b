"""Training: `train()` in loop.py reads top to bottom; the Trainer subclass, its callbacks, the
memory budget, preference tuning (DPO / ORPO) and the CPU/GPU kernels live beside it. The commands
prepare the data first (`prepare_run_data`)."""

from medlora.train.loop import train
from medlora.train.run_files import prepare_run_data, uses_splits

__all__ = ["prepare_run_data", "train", "uses_splits"]
