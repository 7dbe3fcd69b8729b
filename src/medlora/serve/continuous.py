"""Continuous batching on the transformers engine: requests join and leave between decode steps.

Written here, not taken from transformers, after reading what transformers 5.24 ships
(`generate_batch` / `ContinuousBatchingManager`): it packs all requests into one row of paged
attention, so PEFT's per-row `adapter_names` cannot pick an adapter per request, and it drops
`RepetitionPenaltyLogitsProcessor` (`supports_continuous_batching = False`), which the shipped
generation settings use: its answers would differ from the ones eval and the demo measured.

How it works. The running batch shares one KV cache (`DynamicCache`, one row per request, left
padded, with an attention mask marking the padding). A new request is prefilled alone, exactly as
it would be if it were the only one, then its cache is padded and stacked onto the batch's; a
finished request's row is dropped at once (and leading columns that only padding fills are cut),
so a short answer never waits for a long one. Each decode step feeds every row its last token with
its own position; each row keeps its own stop, length limit, repetition control, sampling seed
and adapter.

Relies on transformers internals: `DynamicCache.layers[i].keys / .values` (tensors of shape
[batch, kv_heads, seq, head_dim]) and the `cache=` forward argument. Tested with transformers 5.24
and peft 0.21. Models whose cache is not all full-attention `DynamicLayer`s (sliding-window layers,
e.g. Gemma 2/3) are refused here and served with static batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from medlora.evaluate.generate import stop_token_ids
from medlora.serve.adapters import ModelSet
from medlora.serve.engine import Job, RowTracker
from medlora.serve.token_rules import TokenRules


class NotContinuous(Exception):
    """This model's cache cannot be stacked row by row; serve it with static batching."""


@dataclass
class Row:
    """One request in the running batch."""

    job: Job
    tracker: RowTracker
    ids: list[int]  # prompt + generated so far: what repetition control looks at
    length: int  # this row's tokens in the cache (padding excluded): its next position
    next_token: int  # fed at the next decode step
    rules: TokenRules  # how this row picks its tokens (serve/token_rules.py)


class ContinuousEngine:
    """The transformers engine with continuous batching over one `ModelSet` (base + adapters)."""

    name = "transformers"
    batching = "continuous"
    supports_logprobs = True

    def __init__(self, models: ModelSet, tokenizer: Any, max_batch: int = 8) -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        self.model_set = models
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.stops = set(stop_token_ids(tokenizer))
        probe = DynamicCache(config=models.base.config)
        if any(type(layer) is not DynamicLayer for layer in probe.layers):
            raise NotContinuous("the model's cache has sliding-window or other special layers")
        self.rows: list[Row] = []
        self.cache: Any = None  # DynamicCache shared by the rows
        self.mask: Any = None  # [rows, cache columns]: 1 where a column holds a real token

    @property
    def active(self) -> int:
        return len(self.rows)

    def in_use(self, adapter: str) -> bool:
        return any(row.job.adapter == adapter for row in self.rows)

    # --- the two things the scheduler calls --------------------------------------------------

    def admit(self, job: Job) -> None:
        """Prefill `job` alone, take its first token and, unless that ends it, add it to the batch."""
        import torch
        from transformers import DynamicCache

        model = self.model_set.model
        cache = DynamicCache(config=self.model_set.base.config)
        device = self._device()
        with torch.inference_mode(), self.model_set.rows([job.adapter]):
            out = model(
                input_ids=torch.tensor([job.prompt_ids], device=device),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        row = Row(
            job=job,
            tracker=RowTracker(job, self.tokenizer, self.stops),
            ids=list(job.prompt_ids),
            length=len(job.prompt_ids),
            next_token=-1,
            rules=TokenRules(job.sampling),
        )
        if self._take_token(row, out.logits[0, -1]):
            return
        self._stack(cache, row)

    def step(self) -> None:
        """One decode step for every running row; finished rows leave the batch."""
        import torch

        if not self.rows:
            return
        device = self._device()
        tokens = torch.tensor([[row.next_token] for row in self.rows], device=device)
        positions = torch.tensor([[row.length] for row in self.rows], device=device)
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        adapters = [row.job.adapter for row in self.rows]
        with torch.inference_mode(), self.model_set.rows(adapters):
            out = self.model_set.model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=positions,
                cache=self.cache,
                use_cache=True,
            )
        self.mask = mask
        logits = out.logits[:, -1]
        finished = []
        for index, row in enumerate(self.rows):
            row.length += 1
            if self._take_token(row, logits[index]):
                finished.append(index)
        if finished:
            self._drop(finished)

    def cancel_all(self, message: str) -> None:
        """After an engine error: fail every running row and start from an empty batch."""
        for row in self.rows:
            row.job.fail(message)
        self.rows, self.cache, self.mask = [], None, None

    def run_batch(self, jobs: Sequence[Job]) -> None:
        """Run `jobs` to their end (chat and tests call this directly, without a scheduler)."""
        for job in jobs:
            self.admit(job)
        while self.rows:
            self.step()

    # --- per row -----------------------------------------------------------------------------

    def _take_token(self, row: Row, logits: Any) -> bool:
        """Pick the row's next token from its logits; True when the row is finished."""
        token, logprob = row.rules.next_token(logits, row.ids)
        row.ids.append(token)
        row.next_token = token
        return row.tracker.push(token, logprob)

    # --- the shared cache --------------------------------------------------------------------

    def _stack(self, cache: Any, row: Row) -> None:
        """Add a prefilled row's cache to the batch's, left-padding whichever is shorter."""
        import torch

        ones = torch.ones(1, row.length, dtype=torch.long, device=self._device())
        if self.cache is None:
            self.cache, self.mask, self.rows = cache, ones, [row]
            return
        width = max(self.mask.shape[1], row.length)
        for big, new in zip(self.cache.layers, cache.layers, strict=True):
            big.keys = torch.cat([_left_pad(big.keys, width, 2), _left_pad(new.keys, width, 2)])
            big.values = torch.cat(
                [_left_pad(big.values, width, 2), _left_pad(new.values, width, 2)]
            )
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(ones, width, 1)])
        self.rows.append(row)

    def _drop(self, indices: list[int]) -> None:
        import torch

        keep = [i for i in range(len(self.rows)) if i not in set(indices)]
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        self.rows = [self.rows[i] for i in keep]
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask[index]
        used = torch.nonzero(mask.sum(dim=0)).flatten()
        start = int(used[0]) if len(used) else 0  # columns before it are padding in every row
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def _device(self) -> Any:
        return next(self.model_set.parameters()).device


def _left_pad(tensor: Any, width: int, dim: int) -> Any:
    """`tensor` with zeros added before its `dim` axis up to `width` (cache: 2, mask: 1)."""
    import torch

    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
