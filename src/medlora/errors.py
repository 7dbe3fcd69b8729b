"""User errors: one class per kind, each message names the thing and the fix.

The CLI prints a `MedloraError` as one line and exits 2; anything else is a bug and may show a traceback.
"""


class MedloraError(Exception):
    """A mistake in the user's input or environment, explained in one line."""


class ConfigError(MedloraError):
    """A recipe key or value is invalid."""


class DataError(MedloraError):
    """A data source is missing, malformed or has the wrong columns."""


class ModelError(MedloraError):
    """A model spec cannot be resolved or loaded."""


class TrainingError(MedloraError):
    """Training cannot start or cannot go on (nothing to train, no GPU for fp16, …)."""
