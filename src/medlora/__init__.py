"""medlora: turn a general LLM into a medical question-answering model with LoRA, and prove it."""

__version__ = "0.1.0"
