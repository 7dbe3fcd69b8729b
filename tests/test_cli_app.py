"""The shared CLI plumbing (medlora/cli/app.py) as a user of `medlora train` sees it."""

from __future__ import annotations

import warnings
from pathlib import Path

from medlora.cli.app import _quiet_libraries


def _warnings_while_wrapping(model_dir: Path, quiet: bool) -> list[str]:
    """The warnings shown while PEFT wraps a model for training, as `medlora train` does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with warnings.catch_warnings(record=True) as shown:
        warnings.resetwarnings()  # no filters: every warning is shown (and recorded here)
        if quiet:
            _quiet_libraries()
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    return [str(w.message) for w in shown]


def test_train_commands_hide_a_dependency_deprecation_the_user_cannot_act_on(
    tiny_model_dir: Path,
) -> None:
    # PEFT's wrap reads a deprecated transformers property: the FutureWarning would ask the user
    # to change code that is neither theirs nor medlora's.
    noisy = _warnings_while_wrapping(tiny_model_dir, quiet=False)
    assert any("is_gradient_checkpointing" in message for message in noisy)
    quiet = _warnings_while_wrapping(tiny_model_dir, quiet=True)
    assert not any("is_gradient_checkpointing" in message for message in quiet)
