"""Answer-token loss of a GGUF model under llama.cpp: what a quantization type costs in fidelity.

The same number as `evaluate.loss.score_examples` (token-weighted cross-entropy of the answer
tokens given everything before them), computed from llama.cpp's logits for the same token ids,
so a GGUF type is judged against the float model on the same examples (`bench/inference.py`).

Optional: needs llama-cpp-python (`make fast`). Uses its public `Llama(logits_all=True, lora_path=)`,
`Llama.eval` and `Llama.scores` (tested with llama-cpp-python 0.3.36).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from medlora.data.format import IGNORE_INDEX, Example


def gguf_answer_loss(
    gguf: Path,
    examples: Sequence[Example],
    threads: int,
    progress: Callable[[int], None] | None = None,
    lora: Path | None = None,
) -> dict[str, float]:
    """Token-weighted answer loss of `examples` under llama.cpp on `gguf` (with the GGUF LoRA
    `lora` applied, when given); one example per pass from an empty KV cache (no prefix reuse),
    like `score_examples`' per-example attention."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from llama_cpp import Llama

    n_ctx = max(len(example.input_ids) for example in examples) + 8
    llm = Llama(
        model_path=str(gguf),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        lora_path=str(lora) if lora is not None else None,
        verbose=False,
    )
    total, tokens = 0.0, 0
    try:
        for example in examples:
            ids, labels = example.input_ids, example.labels
            llm.reset()
            llm.eval(ids)
            logits = torch.from_numpy(np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64))
            # Position t's logits predict token t + 1 (labels are aligned with input_ids).
            targets = torch.tensor(labels[1:])
            total += float(
                F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
            )
            tokens += int((targets != IGNORE_INDEX).sum())
            if progress is not None:
                progress(1)
    finally:
        llm.close()
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "answer_tokens": tokens}
