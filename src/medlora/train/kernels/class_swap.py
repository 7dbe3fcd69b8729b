"""Give a module another forward in place: its class becomes a subclass with that forward.

The module keeps its parameters, state dict and `isinstance` checks (the subclass derives from its
class), so PEFT, checkpoints and transformers' own code see the model they built. One subclass is
made per (stock class, prefix) and reused. Used by the CPU kernels `rms_norm.py` and `swiglu.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_SUBCLASSES: dict[tuple[type, str], type] = {}


def swap_forward(
    model: Any, prefix: str, forward: Callable[..., Any], matches: Callable[[Any], bool]
) -> int:
    """Switch every module of `model` for which `matches(module)` to a `<prefix><Class>` subclass
    whose forward is `forward`; returns how many were switched."""
    switched = 0
    for module in model.modules():
        if not matches(module):
            continue
        cls = type(module)
        subclass = _SUBCLASSES.get((cls, prefix))
        if subclass is None:
            subclass = _SUBCLASSES[cls, prefix] = type(
                f"{prefix}{cls.__name__}", (cls,), {"forward": forward}
            )
        module.__class__ = subclass
        switched += 1
    return switched
