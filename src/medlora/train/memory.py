"""Memory as a budget: measure what one packed training row costs, keep the longest row that fits.

`train.max_memory_gb` is the peak a run may reach: resident memory (RSS) on CPU, torch's peak
allocated memory on CUDA. With `train.tokens_per_batch: auto` the run probes forward + backward on
real packed rows before its first step, fits peak = fixed + per_token x tokens, trains on the
longest row (a multiple of `data.max_seq_len`) whose predicted peak stays `HEADROOM` below the
budget, measures that row itself and steps down while it does not fit. When not even one row fits,
it retries with activation checkpointing, then refuses in one line (docs/training-engine.md,
"Memory as a budget").

The peak of one pass on CPU: `ru_maxrss` only ever grows, so Linux's high-water mark is reset
before each pass (`echo 5 > /proc/self/clear_refs`, proc(5)) and `VmHWM` read after it; the peak
from before a reset is kept here (`peak_rss_bytes()`). Elsewhere a thread samples RSS.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

AUTO_MAX_TOKENS = 8192
# Predicted (and probed) peak <= 85 % of the budget, for what the probes do not see: optimizer
# state, the validation pass, allocator slack (90 % was too little: docs/training-engine.md,
# "Memory as a budget").
HEADROOM = 0.85
GIB = 1024**3
PROBE_ROWS = 4  # the longer probe row: up to 4 x max_seq_len tokens, where the budget allows


_EARLIER_PEAK = 0  # the process's peak RSS before the last high-water-mark reset


def _high_water_mark() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_high_water_mark() -> bool:
    """Reset VmHWM to the current RSS, keeping the old peak in `_EARLIER_PEAK`."""
    global _EARLIER_PEAK
    before = _high_water_mark()
    if before is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    _EARLIER_PEAK = max(_EARLIER_PEAK, before)
    return True


def peak_rss_bytes() -> int:
    """The process's peak RSS so far, across high-water-mark resets."""
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return max(maxrss, _high_water_mark() or 0, _EARLIER_PEAK)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, looked up once (find_library runs ldconfig: not for every step)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: RSS keeps the allocator's cache, and the probes are pessimistic


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim), so RSS counts live memory."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def current_rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


class PeakSampler:
    """`with PeakSampler(device) as s: …` → `s.peak` bytes in use at the highest point of the block.

    CPU: the process's exact RSS high-water mark over the block (Linux), else RSS sampled every
    `interval` seconds by a thread. CUDA: torch's peak allocated memory (reset on entry).
    """

    def __init__(self, device: str = "cpu", interval: float = 0.001) -> None:
        self.device = device
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._exact = False

    def __enter__(self) -> PeakSampler:
        release_free_memory()
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self.peak = current_rss_bytes()
        self._exact = _reset_high_water_mark()
        if not self._exact:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.peak = int(torch.cuda.max_memory_allocated())
            return
        if self._exact:
            self.peak = max(self.peak, _high_water_mark() or 0)
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())


@dataclass
class RowChoice:
    """What `tokens_per_batch: auto` measured and chose (written to train_summary.json)."""

    tokens_per_batch: int
    gradient_checkpointing: bool
    budget_gb: float
    per_1k_tokens_gb: float  # what each 1,000 tokens of a row add at the peak
    predicted_peak_gb: float
    probes: list[tuple[int, float]]  # (row tokens, measured peak GB)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "probes": [list(p) for p in self.probes]}


def fit_line(points: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """(fixed, per_token) from two or more (tokens, peak bytes) probes; per_token is never < 0."""
    (x0, y0), (x1, y1) = points[0], points[-1]
    per_token = max(0.0, (y1 - y0) / (x1 - x0)) if x1 != x0 else 0.0
    return y1 - per_token * x1, per_token


def longest_fitting_row(
    fixed: float, per_token: float, budget: float, step: int, cap: int = AUTO_MAX_TOKENS
) -> int:
    """The largest multiple of `step` (at most `cap`) with fixed + per_token x it <= HEADROOM x
    budget; 0 when not even `step` tokens fit."""
    room = HEADROOM * budget - fixed
    if per_token <= 0:
        return cap if room >= 0 else 0
    fits = int(room // (per_token * step)) * step
    return max(0, min(cap, fits))


def _measure(
    probe: Callable[[int], int], step: int, budget: float, floor: Callable[[], int]
) -> tuple[list[tuple[int, int]], float, float]:
    """Probe one `step` row, then a longer one only where even a pessimistic slope says it fits:
    the probes themselves stay within the budget. Returns (points, fixed, per_token)."""
    probe(step)  # first pass: weights paged in, one-time allocations (thread pools, kernels) made
    before = floor()
    half, points = step // 2, [(step, probe(step))]
    # What a token adds: the slope from a half row to a whole one (the per-pass constants, such
    # as the fused head's buffer, cancel out), at least half of everything above the floor per
    # token, then 1.5x: a pessimistic slope. Charging all of it to the tokens picked rows too
    # short.
    average = max(0.0, (points[0][1] - before) / step)
    marginal = fit_line([(half, probe(half)), points[0]])[1] if half > 0 else average
    pessimistic = 1.5 * max(marginal, 0.5 * average)
    longer = PROBE_ROWS * step
    while longer > step and points[0][1] + pessimistic * (longer - step) > HEADROOM * budget:
        longer //= 2
    if longer == step:  # the line through the one measured peak, with the pessimistic slope
        return points, float(points[0][1] - pessimistic * step), pessimistic
    points.append((longer, probe(longer)))
    fixed, per_token = fit_line(points)
    return points, fixed, per_token


def choose_row_tokens(
    probe: Callable[[int], int],
    budget_gb: float,
    step: int,
    *,
    floor: Callable[[], int] = lambda: 0,
    enable_checkpointing: Callable[[], None] | None = None,
) -> RowChoice:
    """Pick the longest row that fits `budget_gb`, from probes of rows of `step` tokens and longer
    (`probe(tokens)` returns the peak bytes of one forward + backward; `floor()` the memory in
    use between passes: weights, optimizer, runtime).

    Raises ValueError (the caller's one-line message) when one `step` row does not fit even with
    activation checkpointing.
    """
    budget = budget_gb * GIB
    checkpointing = False
    while True:
        points, fixed, per_token = _measure(probe, step, budget, floor)
        tokens = longest_fitting_row(fixed, per_token, budget, step)
        if tokens >= step or checkpointing or enable_checkpointing is None:
            break
        enable_checkpointing()
        checkpointing = True
    # The line is extrapolated; the allocator is not linear in tensor sizes. Measure the chosen row
    # itself and step down until it fits (docs/benchmarks.md "memory-budget", how the probes work).
    # The probes count against the budget too, and one RSS reading can be off: a row is probed
    # only at most twice the longest row measured so far and where the pessimistic slope from that
    # row keeps it within the budget; else a shorter row is probed first and the line refitted
    # through the two longest measured rows.
    measured = dict(points)
    while tokens > step:
        if tokens not in measured:
            top = max(measured)
            jump = tokens - top
            risky = measured[top] + 1.5 * per_token * jump > budget
            if jump > step and (risky or jump > top):
                jump = min(jump // 2 if risky else jump, top)
                nearer = top + max(step, jump // step * step)
                measured[nearer] = probe(nearer)
                points.append((nearer, measured[nearer]))
                fixed, per_token = fit_line(sorted(measured.items())[-2:])
                tokens = max(step, min(tokens, longest_fitting_row(fixed, per_token, budget, step)))
                continue
            measured[tokens] = probe(tokens)
            points.append((tokens, measured[tokens]))
        if measured[tokens] <= HEADROOM * budget:
            break
        tokens -= step
    if tokens < step:
        raise ValueError(
            f"one row of {step} tokens needs ~{(fixed + per_token * step) / GIB:.2f} GB at its peak"
            f"{' with activation checkpointing' if checkpointing else ''}"
        )
    return RowChoice(
        tokens_per_batch=tokens,
        gradient_checkpointing=checkpointing,
        budget_gb=budget_gb,
        per_1k_tokens_gb=round(per_token * 1000 / GIB, 3),
        predicted_peak_gb=round(max(fixed + per_token * tokens, measured.get(tokens, 0)) / GIB, 3),
        probes=[(t, round(p / GIB, 3)) for t, p in points],
    )
