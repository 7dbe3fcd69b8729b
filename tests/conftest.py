"""Shared fixtures: real datasets via MEDLORA_DATA_DIR, a tiny random Llama and its tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real datasets (CI sets MEDLORA_DATA_DIR=../shared/datasets)."""
    root = os.environ.get("MEDLORA_DATA_DIR")
    if not root or not Path(root).is_dir():
        pytest.skip("MEDLORA_DATA_DIR is not set to the shared datasets folder")
    return Path(root)


@pytest.fixture(autouse=True)
def _isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep every test's downloads and conversions out of the user's ~/.cache, except the model cache.

    MEDLORA_CACHE stays shared across the session (set once below) so SmolLM2 is converted once.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")


TINY_CORPUS = [
    "What are the symptoms of asthma? Wheezing, coughing, chest tightness and shortness of breath.",
    "How is diabetes treated? Diet, exercise, blood sugar monitoring, metformin or insulin.",
    "What causes anemia? Low iron, vitamin B12 deficiency, blood loss or chronic disease.",
    "Is hypertension inherited? High blood pressure often runs in families.",
    "What is the outlook for people with migraine? Most people manage attacks with treatment.",
]


def build_tiny_tokenizer() -> object:
    """A byte-level BPE tokenizer with a ChatML template, trained in milliseconds on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from medlora.models import DEFAULT_CHAT_TEMPLATE

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TINY_CORPUS * 5, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast


def build_tiny_llama(vocab_size: int, seed: int = 0, **sizes: int) -> object:
    """A random Llama of ~200k parameters: real architecture, milliseconds per step. `sizes`
    override its config (e.g. a wide `intermediate_size` where activations must dominate)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        **{
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "tie_word_embeddings": True,
            "initializer_range": 0.2,  # large enough embeddings that a LoRA can be confident
            **sizes,
        }
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> object:
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: object) -> Path:
    """A save_pretrained folder with the tiny Llama and tokenizer: a valid `model.name` spec."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny_llama(len(tiny_tokenizer))  # type: ignore[arg-type]
    model.config.pad_token_id = tiny_tokenizer.pad_token_id  # type: ignore[attr-defined]
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]
    return folder


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One shared MEDLORA_CACHE for slow tests, so SmolLM2 is converted from GGUF once per session."""
    preset = os.environ.get("MEDLORA_CACHE")
    return Path(preset) if preset else tmp_path_factory.mktemp("medlora-cache")
