"""The llama.cpp continuous engine prefills prompts in pieces its plain attention kernel takes."""

from __future__ import annotations

import pytest

from medlora.serve.llama_cpp_continuous import TILED_ATTENTION_ROWS, prefill_chunks


@pytest.mark.parametrize("n", [1, 2, 62, 63, 64, 65, 126, 127, 200, 1000])
def test_prompts_are_prefilled_in_pieces_the_plain_attention_kernel_takes(n: int) -> None:
    """Under 64 tokens (llama.cpp tiles 64+ query rows) and never one token of a longer prompt
    (one query row over 512+ cells takes the split kernel): both sum unlike the plain kernel."""
    pieces = prefill_chunks(n)
    assert pieces[0][0] == 0 and pieces[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:], strict=False))  # contiguous
    assert all(end - start < TILED_ATTENTION_ROWS for start, end in pieces)
    assert n == 1 or all(end - start >= 2 for start, end in pieces)
    assert len(pieces) == -(
        -n // (TILED_ATTENTION_ROWS - 1)
    )  # no more llama_decode calls than needed
