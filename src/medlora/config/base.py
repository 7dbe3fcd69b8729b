"""What every recipe section shares: strict pydantic sections and the default system prompt."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful medical assistant. Answer the question accurately and clearly."
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
