"""The base of every config section (``unclip.datasets.config`` and the sections beside it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# Marks a field that does not change what is trained (sampling, bookkeeping): left out of the hash.
NOT_IDENTITY = {"identity": False}
# Marks a field added after runs were named: it joins the hash only when set to something other
# than its default, so every run named before it existed keeps its name.
IDENTITY_UNLESS_DEFAULT = {"identity": "unless_default"}


class ConfigSection(BaseModel):
    """Base for every config section: unknown keys are an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class IdentitySection(ConfigSection):
    """A section of what is trained: its identity fields name runs and checkpoints.

    A field marked :data:`NOT_IDENTITY` is left out (it does not change what is trained); one
    marked :data:`IDENTITY_UNLESS_DEFAULT` is left out at its default.
    """

    def identity(self) -> dict:
        """The fields that shape a trained model, as JSON: what run names and checkpoints hash."""
        out = {}
        for name, field in type(self).model_fields.items():
            kind = (field.json_schema_extra or {}).get("identity")
            if kind is False:
                continue
            value = getattr(self, name)
            if kind == "unless_default" and value == field.get_default(call_default_factory=True):
                continue
            out[name] = value.identity() if isinstance(value, IdentitySection) else self._json(name)
        return out

    def _json(self, name: str):
        return self.model_dump(mode="json", include={name})[name]
