"""The base of every config section (``unclip.datasets.config`` and the sections beside it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigSection(BaseModel):
    """Base for every config section: unknown keys are an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=True)
