"""Tiny random models of every family in medlora.families, from transformers' own config classes.

Each has the family's real architecture at ~100k parameters: 2 layers, 4 query / 2 key-value heads,
and its config class's defaults otherwise (tied embeddings where the family ties them: llama.cpp
expects OLMo 2's untied output layer, for one).
Families with sliding-window attention get a window of `WINDOW` tokens, shorter than the test
examples, so a packed row that ignored it would train differently; Gemma 2 keeps its attention and
final-logit soft-capping, Granite gets non-trivial multipliers and logit scaling.
"""

from __future__ import annotations

from typing import Any

WINDOW = 16
LOCAL_AND_GLOBAL = ["sliding_attention", "full_attention"]

FAMILY_OPTIONS: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": WINDOW},
    # query_pre_attn_scalar = head_dim, as in the real Gemma 2 2B/9B and Gemma 3 1B-12B (llama.cpp
    # scales attention by head_dim for those sizes, whatever the config says).
    "gemma2": {
        "sliding_window": WINDOW,
        "layer_types": LOCAL_AND_GLOBAL,
        "query_pre_attn_scalar": 16,
    },
    # Gemma 3's own pattern (five local layers, then a global one), which llama.cpp assumes too.
    "gemma3_text": {"sliding_window": WINDOW, "num_hidden_layers": 6, "query_pre_attn_scalar": 16},
    "granite": {
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.3,
        "logits_scaling": 2.0,
    },
}


def build_tiny_family(model_type: str, vocab_size: int, seed: int = 0) -> Any:
    """A random causal LM of `model_type` with its family's default attention implementation."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    sizes = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.2,
    }
    config = AutoConfig.for_model(model_type, **{**sizes, **FAMILY_OPTIONS.get(model_type, {})})
    return AutoModelForCausalLM.from_config(config)
