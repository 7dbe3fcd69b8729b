"""`medlora sweep`: one LoRA run per value of one recipe key, then a table and a plot.

    medlora sweep RECIPE --set lora.r=4,8,16,32 --set train.max_steps=200 --out DIR

A `--set` whose value is a bare comma list is the sweep axis (exactly one); every other `--set` is a
fixed override. YAML lists (`[a,b]`) and quoted strings stay single values. Every run goes through
`medlora.train.train()` on a fresh copy of the base model (LoRA injects layers into the model object,
so an adapted model is never reused) and lands in `DIR/<key>=<value>/`. The results are
`DIR/sweep.json`, `DIR/sweep.md` and `DIR/sweep.png`.

With `--unseen`, every run is also scored on the recipe's `eval.unseen_sources` (sources it never
trained on): answer loss and the generated answers' metrics, base vs tuned with paired 95% intervals
(`medlora.evaluate.unseen`). The base's answers are generated once and reused while the questions and
generation settings stay the same. This is the score to choose a recipe by: a lower loss on the
validation split can come with worse answers on new sources.

Validation loss here is always the same number for every run: the token-weighted answer-token
cross-entropy of the *saved* adapter on the run's validation split
(`medlora.evaluate.loss.score_examples`), not the Trainer's `eval_loss` (a mean of batch means).

The package: `plan.py` (the axis and every run's recipe), `run.py` (`run_sweep`) and `tables.py`
(sweep.md, sweep.png, sweep.json and the terminal table).
"""

from __future__ import annotations

from medlora.sweep.plan import (
    LOSS_NOTE,
    PER_RUN_DATA_KEYS,
    SweepPlan,
    SweepResult,
    is_sweep_value,
    plan_sweep,
    recipe_value,
    run_dir_name,
    split_axis,
)
from medlora.sweep.run import (
    adapter_parameter_count,
    run_sweep,
    validation_loss,
)
from medlora.sweep.tables import (
    describe_row,
    fmt_params,
    markdown_table,
    plot_sweep,
    summary_table,
    sweep_markdown,
    unseen_table,
    write_sweep_files,
)

__all__ = [
    "LOSS_NOTE",
    "PER_RUN_DATA_KEYS",
    "SweepPlan",
    "SweepResult",
    "adapter_parameter_count",
    "describe_row",
    "fmt_params",
    "is_sweep_value",
    "markdown_table",
    "plan_sweep",
    "plot_sweep",
    "recipe_value",
    "run_dir_name",
    "run_sweep",
    "split_axis",
    "summary_table",
    "sweep_markdown",
    "unseen_table",
    "validation_loss",
    "write_sweep_files",
]
