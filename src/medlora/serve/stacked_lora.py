"""Batches that mix LoRA adapters, in two small matrix products per layer whatever the adapters.

Written here rather than using PEFT's mixed-batch path (`LoraLayer._mixed_batch_forward`), because
that path was measured to be most of a serving decode step: per layer and per adapter it gathers the
adapter's rows, runs its A and B and scatters the result back, a dozen small operations and Python
list work each time. On SmolLM2-135M (7 LoRA targets × 30 layers), 3 adapters and the base mixed in
32 rows, it took 12.5 s of an 18.6 s continuous-batching run (cProfile; `bench/load_test.py`
measures the server). Here each layer keeps every adapter's A concatenated into one [Σr, in] matrix
and every B, times its scaling, into one [out, Σr]: `x @ A_allᵀ` gives all adapters' r columns for
every row, a [rows, Σr] mask keeps each row's own adapter's columns (none for the base), and
`@ B_allᵀ` adds the update to the base layer's output. The extra work is (adapters − 1) · r
columns per row: nothing at serving ranks. The arithmetic is LoRA's, x·Aᵀ·Bᵀ·scaling; only the
order of the floating-point sums may differ from PEFT's.

Used only when every loaded adapter is a plain LoRA on linear layers (no DoRA or other variant, no
LoRA bias); otherwise the server keeps PEFT's path. Relies on PEFT internals, tested with peft
0.21: `LoraLayer.lora_A` / `lora_B` (ModuleDicts of `nn.Linear`), `.scaling`, `.lora_variant`, and
`._disable_adapters` (True: the layer's forward is its base layer's), set for the length of a batch
only, so outside one the model is an ordinary PeftModel with its active adapter.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass
class LayerStack:
    """One LoRA layer's adapters, concatenated in `names` order."""

    layout: tuple[tuple[str, int], ...]  # (adapter, rank) per block of columns
    a: Any  # [Σr, in]
    b: Any  # [out, Σr], each adapter's block times its scaling


def unsupported(layers: Iterable[Any], adapters: set[str]) -> str | None:
    """Why these layers cannot be stacked (None: they can)."""
    import torch

    for layer in layers:
        for name in adapters & set(layer.lora_A.keys()):
            if name in getattr(layer, "lora_variant", {}):
                return f"adapter {name} uses a LoRA variant (e.g. DoRA)"
            a, b = layer.lora_A[name], layer.lora_B[name]
            if not isinstance(a, torch.nn.Linear) or not isinstance(b, torch.nn.Linear):
                return f"adapter {name} adapts a layer that is not linear"
            if b.bias is not None:
                return f"adapter {name} has a LoRA bias"
    return None


def stack_layer(layer: Any, adapters: set[str]) -> LayerStack | None:
    """`layer`'s loaded adapters as one A and one B (None when it adapts none of them)."""
    import torch

    names = sorted(adapters & set(layer.lora_A.keys()))
    if not names:
        return None
    with torch.no_grad():
        a = torch.cat([layer.lora_A[name].weight for name in names], dim=0)
        b = torch.cat([layer.lora_B[name].weight * layer.scaling[name] for name in names], dim=1)
    layout = tuple((name, layer.lora_A[name].weight.shape[0]) for name in names)
    return LayerStack(layout, a.contiguous(), b.contiguous())


class StackedLora:
    """The stacks of every LoRA layer and the current batch's row masks."""

    def __init__(self) -> None:
        self.layers: list[Any] = []  # the model's LoRA layers
        self.stacks: dict[int, LayerStack | None] = {}  # id(layer) → its stack
        self._was_disabled: list[bool] = []
        self.rows: list[str] | None = None  # adapter per batch row, inside ModelSet.rows
        self._masks: dict[tuple[tuple[str, int], ...], Any] = {}

    def build(self, layers: Iterable[Any], adapters: set[str]) -> None:
        """(Re)build after a load or unload."""
        self.layers = list(layers)
        self.stacks = {id(layer): stack_layer(layer, adapters) for layer in self.layers}

    def clear(self) -> None:
        self.layers, self.stacks = [], {}

    def start(self, adapters: list[str]) -> None:
        """A batch begins: each layer's own LoRA path is off, the hook adds the stacked update.

        Outside a batch the model stays an ordinary PeftModel with its active adapter."""
        self.rows, self._masks = list(adapters), {}
        self._was_disabled = [layer._disable_adapters for layer in self.layers]
        for layer in self.layers:
            layer._disable_adapters = True

    def stop(self) -> None:
        for layer, was in zip(self.layers, self._was_disabled, strict=False):
            layer._disable_adapters = was
        self.rows, self._masks, self._was_disabled = None, {}, []

    def add_update(self, module: Any, args: tuple[Any, ...], output: Any) -> Any:
        """Forward hook of a LoRA layer: its output plus each row's own adapter's update."""
        import torch.nn.functional as F

        stack = self.stacks.get(id(module))
        if stack is None or self.rows is None:
            return output
        x = args[0]
        mask = self._mask(stack.layout, x.shape[0], stack.a)
        if mask is None:  # every row is the base, or uses adapters this layer does not have
            return output
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (mask.shape[1],)
        hidden = F.linear(x.to(stack.a.dtype), stack.a) * mask.view(shape)
        return output + F.linear(hidden, stack.b).to(output.dtype)

    def _mask(self, layout: tuple[tuple[str, int], ...], batch: int, like: Any) -> Any:
        """[rows, Σr]: 1 in the columns of each row's adapter; cached per batch and layout."""
        import torch

        if layout in self._masks:
            return self._masks[layout]
        assert self.rows is not None
        if len(self.rows) != batch:
            raise ValueError(f"{len(self.rows)} adapter names for a batch of {batch} rows")
        offsets, start = {}, 0
        for name, rank in layout:
            offsets[name] = (start, start + rank)
            start += rank
        mask = None
        if any(name in offsets for name in self.rows):
            mask = torch.zeros(len(self.rows), start, dtype=like.dtype, device=like.device)
            for row, name in enumerate(self.rows):
                if name in offsets:
                    low, high = offsets[name]
                    mask[row, low:high] = 1
        self._masks[layout] = mask
        return mask
