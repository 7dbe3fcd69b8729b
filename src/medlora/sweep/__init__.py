"""`medlora sweep`: one LoRA run per value of one recipe key, then a table and a plot (the user's
side: docs/guide.md, "Sweeps").

    medlora sweep RECIPE --set lora.r=4,8,16,32 --set train.max_steps=200 --out DIR

A `--set` whose value is a bare comma list is the sweep axis (exactly one); every other `--set` is a
fixed override. Every run trains a fresh copy of the base model (LoRA injects layers into the model
object, so an adapted model is never reused) into `DIR/<key>=<value>/`. Every saved adapter is then
scored the same way: its token-weighted answer loss on the validation split (as `medlora eval` scores
it, not the Trainer's `eval_loss`, a mean of batch means) and, with `--unseen`, base vs tuned on the
recipe's `eval.unseen_sources` (`medlora.evaluate.unseen`, the base's answers generated once). That
is the score to choose a recipe by: a lower validation loss can come with worse answers on new sources.

The package: `plan.py` (the axis and every run's recipe), `run.py` (`run_sweep`) and `tables.py`
(sweep.md from report/templates/sweep.md.j2, sweep.png, sweep.json and the terminal's tables).
"""

from __future__ import annotations

from medlora.sweep.plan import split_axis
from medlora.sweep.run import run_sweep
from medlora.sweep.tables import markdown, runs_table, summary_table

__all__ = ["markdown", "run_sweep", "runs_table", "split_axis", "summary_table"]
