"""Continuous batching on llama.cpp: one base GGUF, GGUF LoRAs, many requests decoded together.

The same scheduler contract as the transformers engine's (serve/continuous.py: `admit`, `step`,
`active`): each request is its own llama.cpp sequence; a new request is prefilled, then joins the
decode steps; a finished one leaves at once (its cache cells are retired, see below). llama.cpp
applies LoRA adapters per context, not per sequence, and switching a context's adapters re-plans
its compute graph (slower than one model per context: docs/benchmarks.md, "serve-load-llama.cpp"), so
each served model gets its own context (created at its first request) on the one model in memory:
a decode step runs one `llama_decode` per model in use, over that model's rows.

Written here on llama.cpp's C API (llama-cpp-python's ctypes bindings, tested with 0.3.36:
`llama_batch_init`, `llama_decode`, `llama_get_logits_ith`, `llama_memory_seq_rm`,
`llama_set_adapters_lora`), because llama-cpp-python's `Llama` decodes one sequence at a time.
How decode speed grows with rows: docs/benchmarks.md, "llama-cpp-rows".

Tokens are picked from llama.cpp's logits with transformers' rules (serve/token_rules.py), as in
the one-sequence engine (serve/llama_cpp.py).

Opt-in (`--batching continuous`; `auto` keeps llama.cpp at one request at a time): it pays off
under many users, while one user is served a little slower by it (below) in more memory, and
K-quant bases are not batch-invariant. Three causes made a greedy answer part from the same
request's answer alone, each measured and fixed (docs/benchmarks.md, "serve-load-llama.cpp"):
- LoRA products, fixed: llama.cpp multiplies a float LoRA A by a batch with its llamafile GEMM and
  by one row with its dot product, which sum in different orders. The GGUF LoRA's rank is now
  padded off a multiple of 4 (export/lora_pad.py), which keeps both on the dot product: on q8_0,
  q5_0 and q4_0 bases each row's logits are then bit-identical alone and in a batch. K-quant bases
  (q4_K_M, q5_K_M, q6_K) stay batch-variant in their own kernels, adapter or not.
- Freed cache cells, fixed: when a row ends, llama.cpp's cache search (`find_slot`, restarting
  at cell 0 when enough cells before its head are free) put the next token of a row still running
  into the freed cells, before its earlier tokens; attention then summed that row's cells in
  another order than alone, and an 8-bit rounding of the activations could flip a later token.
  A finished row's cells are therefore handed to a placeholder sequence (`retired_seq`) instead of
  freed, so no cell below a running row is ever empty, and freed all at once when the context has
  no running row. Retired cells count against `n_ctx` until then, so under unbroken traffic a
  context now and then admits nothing until its running rows finish. Measured under 32 clients
  (docs/benchmarks.md, "serve-load-llama.cpp"): every answer equal to the same request alone,
  where freed cells gave fewer, for fewer tokens/s than with freed cells (a second context per
  model, to admit while the first drains, gave no more tokens/s for more memory).
- Attention paths (ggml-cpu's `ggml_compute_forward_flash_attn_ext_f16`, llama-cpp-python
  0.3.36): its plain kernel gives each query row all of the context's cells in order and skips the
  masked ones, so a row's sum is the same whoever else holds cells. Two other kernels are not: one
  query row over 512+ cells takes a split kernel (partial sums per thread), and 64+ query rows
  (`GGML_FA_TILE_Q`) a tiled one (masked cells inside its tiles). Both are kept off, alone and in
  company alike: a step with one row over 256+ cells gets a throwaway second token (`step`), and
  prompts are prefilled in chunks of 2 to 63 tokens (`prefill_chunks`). `max_batch` stays under 63
  for the same reason. What that costs one request alone (a long prompt's first token, a lone row's
  decode past 256 cells): docs/benchmarks.md, "llama-cpp-plain-attention"; rows in company take
  neither kernel anyway.

Each context has `n_ctx` cache cells, shared by its running requests (llama.cpp allocates and
clears them when the context is made). A request is admitted when its prompt plus
`max_new_tokens` fits in the cells its model's running requests leave; until then it waits here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medlora.errors import ModelError
from medlora.evaluate.generate import stop_token_ids
from medlora.machine import default_threads
from medlora.serve.engine import Job, RowTracker
from medlora.serve.llama_cpp import PREFILL_BATCH, WARM_PROMPT, load_lora, set_lora
from medlora.serve.token_rules import TokenRules

# ggml-cpu's flash attention tiles 64+ query rows (GGML_FA_TILE_Q in ggml-cpu/common.h, 0.3.36)
# and splits one query row's cells across threads from 512 cells (256 rounded up by llama.cpp's
# cache padding); see the module's docstring.
TILED_ATTENTION_ROWS = 64
SPLIT_ATTENTION_CELLS = 256


def prefill_chunks(n: int) -> list[tuple[int, int]]:
    """(start, end) of the pieces a prompt of `n` tokens is prefilled in: as few as keep each under
    TILED_ATTENTION_ROWS tokens, of near-equal length, so none is a single token (one query row
    would take the split kernel beside other rows' cells) unless the prompt is."""
    pieces = -(-n // (TILED_ATTENTION_ROWS - 1))
    bounds = [round(i * n / pieces) for i in range(pieces + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


@dataclass
class ModelContext:
    """One served model's llama.cpp context: its adapter applied once, its sequences' cells."""

    ctx: Any
    memory: Any
    free_seqs: list[int]
    cells_used: int = 0  # reserved by running rows: prompt + max_new_tokens each
    retired: int = 0  # still held by finished rows, under the engine's retired_seq


@dataclass
class Sequence:
    """One request: its context and sequence id, tokens so far and the cells it reserved."""

    job: Job
    tracker: RowTracker
    context: ModelContext
    seq: int
    ids: list[int]  # prompt + answer so far: what repetition control looks at
    cells: int  # prompt + max_new_tokens, reserved at admission
    next_token: int = -1
    rules: TokenRules | None = None  # set when the row starts


class LlamaCppContinuous:
    """llama.cpp with continuous batching over one base GGUF and its GGUF LoRAs."""

    name = "llama.cpp"
    batching = "continuous"
    supports_logprobs = True

    def __init__(
        self,
        base: Path,
        loras: dict[str, Path | None],
        tokenizer: Any,
        threads: int | None = None,
        n_ctx: int = 2048,
        max_batch: int = 8,
    ) -> None:
        import llama_cpp
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # llama.cpp's info and debug lines (as Llama(verbose=False) does)
        self.tokenizer = tokenizer
        self.stops = set(stop_token_ids(tokenizer))
        if not 0 < max_batch < TILED_ATTENTION_ROWS - 1:  # rows + the spare token, untiled
            raise ModelError(f"max_batch must be 1 to {TILED_ATTENTION_ROWS - 2} on llama.cpp")
        self.max_batch = max_batch
        self.retired_seq = max_batch  # the placeholder sequence of finished rows' cells
        self.n_ctx = n_ctx
        self.threads = threads or default_threads()
        self._model = llama_cpp.llama_model_load_from_file(
            str(base).encode(), llama_cpp.llama_model_default_params()
        )
        if not self._model:
            raise ModelError(f"llama.cpp could not load {base}")
        self._batch = llama_cpp.llama_batch_init(max(PREFILL_BATCH, max_batch), 0, 1)
        vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self._adapters: dict[str, Any] = {}  # served name -> LoRA handle (None: the base)
        self._contexts: dict[str, ModelContext] = {}  # served name -> its context, once used
        for name, path in loras.items():
            self.add_lora(name, path)
        self.rows: list[Sequence] = []
        self.waiting: deque[Job] = deque()
        self._warm(next(iter(loras)))

    def _warm(self, model: str) -> None:
        """Prefill a short prompt once at load time, so the first request does not pay for
        faulting in the memory-mapped weights."""
        import llama_cpp

        context = self._context(model)
        prompt = self.tokenizer.encode(WARM_PROMPT, add_special_tokens=False) or [0]
        self._decode(context, [(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
        llama_cpp.llama_memory_seq_rm(context.memory, 0, -1, -1)

    def _context(self, model: str) -> ModelContext:
        """`model`'s context, made at its first request with its adapter applied once."""
        import llama_cpp

        if model in self._contexts:
            return self._contexts[model]
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = params.n_ubatch = PREFILL_BATCH
        params.n_seq_max = self.max_batch + 1  # the last id holds finished rows' cells
        params.n_outputs_max = params.n_seq_max  # logits kept: one per row, not per prompt token
        params.n_threads = params.n_threads_batch = self.threads
        params.flash_attn_type = 1  # fused attention, as the one-sequence engine
        params.kv_unified = True  # one pool of cells for the context's sequences
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not ctx:
            raise ModelError(f"llama.cpp could not create a context of {self.n_ctx} cells")
        set_lora(ctx, self._adapters[model])
        memory = llama_cpp.llama_get_memory(ctx)
        context = ModelContext(ctx, memory, list(range(self.max_batch))[::-1])
        self._contexts[model] = context
        return context

    def close(self) -> None:
        """Free llama.cpp's contexts, batch and model (the adapters go with the model)."""
        import llama_cpp

        if self._model:
            for context in self._contexts.values():
                llama_cpp.llama_free(context.ctx)
            self._contexts.clear()
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: llama_cpp may be gone already
            pass

    # --- adapters ------------------------------------------------------------------------------

    def add_lora(self, name: str, path: Path | None) -> None:
        """Serve `name` as the GGUF LoRA `path` (None: the base); in the engine's thread."""
        self._adapters[name] = load_lora(self._model, path)

    def remove_lora(self, name: str) -> None:
        """Stop serving `name`: free its context, then its adapter (no request of it runs)."""
        import llama_cpp

        context = self._contexts.pop(name, None)
        if context is not None:
            llama_cpp.llama_free(context.ctx)
        adapter = self._adapters.pop(name)
        if adapter is not None:
            llama_cpp.llama_adapter_lora_free(adapter)

    def in_use(self, adapter: str) -> bool:
        return any(row.job.model == adapter for row in self.rows) or any(
            job.model == adapter for job in self.waiting
        )

    # --- the scheduler's contract --------------------------------------------------------------

    @property
    def active(self) -> int:
        return len(self.rows) + len(self.waiting)

    def admit(self, job: Job) -> None:
        cells = len(job.prompt_ids) + job.sampling.max_new_tokens
        if cells > self.n_ctx:
            raise ModelError(
                f"prompt ({len(job.prompt_ids)} tokens) + max_tokens "
                f"({job.sampling.max_new_tokens}) exceed the context of {self.n_ctx} tokens"
            )
        self.waiting.append(job)
        self._start_waiting()

    def step(self) -> None:
        """One decode step for every running row: one llama_decode per model in use."""
        import llama_cpp

        self._start_waiting()
        groups: dict[int, list[Sequence]] = {}
        for row in self.rows:
            groups.setdefault(id(row.context), []).append(row)
        finished = []
        for rows in groups.values():
            context = rows[0].context
            items = [(r.next_token, len(r.ids) - 1, r.seq, True) for r in rows]
            # One row over 256+ cells (its own or retired ones): llama.cpp would attend with its
            # split kernel, whose sums depend on how many cells there are. A throwaway token of
            # the retired sequence, last in the batch (the top cell, freed at once), keeps the
            # step on the plain kernel, which sums a row's cells alike alone and in company.
            spare = len(rows) == 1 and context.retired + len(rows[0].ids) >= SPLIT_ATTENTION_CELLS
            if spare:
                spare_pos = llama_cpp.llama_memory_seq_pos_max(context.memory, self.retired_seq) + 1
                items.append((rows[0].next_token, spare_pos, self.retired_seq, False))
            self._decode(context, items)
            if spare:
                llama_cpp.llama_memory_seq_rm(context.memory, self.retired_seq, spare_pos, -1)
            for index, row in enumerate(rows):
                if self._take(row, self._logits(context, index)):
                    finished.append(row)
        for row in finished:
            self._end(row)

    def cancel_all(self, message: str) -> None:
        for row in list(self.rows):
            row.job.fail(message)
            self._end(row)
        for job in self.waiting:
            job.fail(message)
        self.waiting.clear()

    def run_batch(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.admit(job)
        while self.active:
            self.step()

    # --- per request ---------------------------------------------------------------------------

    def _start_waiting(self) -> None:
        """Prefill waiting requests in arrival order, each once its model's context has a free
        sequence and enough cells; a request that must wait does not hold up other models'."""
        for job in list(self.waiting):
            if job.cancelled.is_set():
                self.waiting.remove(job)
                job.finish("cancelled")
                continue
            context = self._context(job.model)
            cells = len(job.prompt_ids) + job.sampling.max_new_tokens
            if not context.free_seqs or context.cells_used + context.retired + cells > self.n_ctx:
                continue
            self.waiting.remove(job)
            tracker = RowTracker(job, self.tokenizer, self.stops)
            seq = context.free_seqs.pop()
            row = Sequence(job, tracker, context, seq, list(job.prompt_ids), cells)
            row.rules = TokenRules(job.sampling)
            context.cells_used += cells
            ids = job.prompt_ids
            try:
                for start, end in prefill_chunks(len(ids)):
                    self._decode(context, [(ids[i], i, seq, i == len(ids) - 1)
                                           for i in range(start, end)])  # fmt: skip
            except Exception as error:  # give the sequence and its cells back, end the request
                job.fail(f"generation failed: {type(error).__name__}")
                self.rows.append(row)
                self._end(row)
                raise
            self.rows.append(row)
            if self._take(row, self._logits(context, end - 1 - start)):  # the last piece's last
                self._end(row)

    def _take(self, row: Sequence, logits: np.ndarray) -> bool:
        """Pick the row's next token; True when the row is finished (or cancelled)."""
        assert row.rules is not None
        token, logprob = row.rules.next_token(logits, row.ids)
        row.ids.append(token)
        row.next_token = token
        return row.tracker.push(token, logprob)

    def _end(self, row: Sequence) -> None:
        import llama_cpp

        self.rows.remove(row)
        context = row.context
        if any(other.context is context for other in self.rows):
            # Keep the cells occupied (see the module's docstring): no hole below a running row.
            llama_cpp.llama_memory_seq_cp(context.memory, row.seq, self.retired_seq, -1, -1)
            context.retired += len(row.ids)
        else:  # nothing runs in this context any more: every cell can go
            llama_cpp.llama_memory_seq_rm(context.memory, self.retired_seq, -1, -1)
            context.retired = 0
        llama_cpp.llama_memory_seq_rm(context.memory, row.seq, -1, -1)
        context.free_seqs.append(row.seq)
        context.cells_used -= row.cells
        row.tracker.finish("length")  # no-op when it already ended (stop, cancelled)

    # --- llama.cpp -----------------------------------------------------------------------------

    def _decode(self, context: ModelContext, items: list[tuple[int, int, int, bool]]) -> None:
        import llama_cpp

        batch = self._batch
        batch.n_tokens = len(items)
        for i, (token, position, seq, logits) in enumerate(items):
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        status = llama_cpp.llama_decode(context.ctx, batch)
        if status != 0:
            raise ModelError(f"llama_decode failed (status {status})")

    def _logits(self, context: ModelContext, index: int) -> np.ndarray:
        """Logits after the token at `index` of the last decode's batch (one with logits on)."""
        import llama_cpp

        pointer = llama_cpp.llama_get_logits_ith(context.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
