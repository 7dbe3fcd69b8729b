"""Give a module another forward in place: its class becomes a subclass with that forward.

The module keeps its parameters, state dict and `isinstance` checks (the subclass derives from its
class), so PEFT, checkpoints and transformers' own code see the model they built. One subclass is
made per (stock class, prefix) and reused. Used by the CPU kernels `rms_norm.py` and `swiglu.py`,
which also check with `same_as_stock` that the swapped forward computes what the class did.
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


_CHECKED: dict[tuple[type, Callable[..., Any]], bool] = {}


def same_as_stock(module: Any, forward: Callable[..., Any], shape: tuple[int, ...]) -> bool:
    """Whether `forward` computes the module's own forward and input gradient (checked once per
    class on a small random input, dropout off). A class list picks modules by name; this catches
    a same-named class whose computation changed in a new library release."""
    import torch

    key = (type(module), forward)
    if key not in _CHECKED:
        flags = [(m, m.training) for m in module.modules()]
        module.eval()
        try:
            param = next(module.parameters())
            generator = torch.Generator().manual_seed(0)
            x = torch.randn((2, 3, *shape), generator=generator).to(param.dtype)
            results = []
            for run in (type(module).forward, forward):
                leaf = x.clone().requires_grad_(True)
                with torch.enable_grad():
                    out = run(module, leaf)
                    (grad,) = torch.autograd.grad(out.float().sum(), leaf)
                results.append((out.detach().float(), grad.float()))
            (out_a, grad_a), (out_b, grad_b) = results
            tolerance = 1e-2 if param.dtype != torch.float32 else 1e-5
            _CHECKED[key] = bool(
                torch.allclose(out_a, out_b, rtol=tolerance, atol=tolerance)
                and torch.allclose(grad_a, grad_b, rtol=tolerance, atol=tolerance)
            )
        except Exception:  # a forward that cannot even run on the probe is not the stock one
            _CHECKED[key] = False
        finally:
            for m, training in flags:
                m.training = training
    return _CHECKED[key]
