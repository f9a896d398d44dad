"""The typed values assets pass downstream, and their JSON form on the storage root.

Each asset returns one of these (or a dataclass of the package that made it: ``EmbeddingClip``,
``FitResult``, ``CascadeEvaluation``); ``value_store.StoreValueIOManager`` writes it as JSON next
to the data, so a run on one machine can follow a run on another.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from unclip.datasets.ingest import IngestResult
from unclip.datasets.ingest_stats import format_summary
from unclip.training.engine.trainer import FitResult
from unclip.training.evaluation.trained_cascade import CascadeEvaluation
from unclip.training.models.clip_pin import EmbeddingClip


@dataclass(frozen=True)
class SourceList:
    """One source's URL list, read as ingest will read it."""

    source: str
    url_list: str
    rows: int


@dataclass(frozen=True)
class IngestSummary:
    """What ingest did for one source (and its retry of failed samples, when asked)."""

    source: str
    shards_written: int
    shards_skipped: int
    successes: int
    failures: int
    skipped: bool
    warnings: list[str] = field(default_factory=list)
    summaries: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, source: str, results: list[IngestResult]) -> IngestSummary:
        """Add up one source's ingest runs (none: the source was complete already)."""
        return cls(
            source=source,
            shards_written=sum(r.shards_written for r in results),
            shards_skipped=results[0].shards_skipped if results else 0,
            successes=sum(r.successes for r in results),
            failures=sum(r.failures for r in results),
            skipped=not results,
            warnings=[w for r in results for w in r.warnings],
            summaries=[format_summary(r.stats) for r in results if r.stats],
        )


@dataclass(frozen=True)
class EmbedSummary:
    """What embedding did for one source."""

    source: str
    clip_id: str
    shards_written: int
    shards_skipped: int


@dataclass(frozen=True)
class DatasetVersion:
    """The manifest training and evaluation read: its version (a content hash) and size."""

    version: str
    num_samples: int
    num_shards: int
    embedding_dim: int


@dataclass(frozen=True)
class PromotionOutcome:
    """The gate's answer for one model's latest run."""

    model: str
    run: str | None
    status: str
    promote: bool
    reasons: list[str] = field(default_factory=list)


VALUE_TYPES: dict[str, type] = {
    t.__name__: t
    for t in (
        SourceList,
        IngestSummary,
        EmbedSummary,
        DatasetVersion,
        PromotionOutcome,
        EmbeddingClip,
        FitResult,
        CascadeEvaluation,
    )
}


def to_json(value: Any) -> Any:
    """A value as JSON data: dataclasses tagged with their type name, containers walked."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__type__": type(value).__name__, **fields}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    return value


def from_json(data: Any) -> Any:
    """The inverse of ``to_json``; an unknown type name is an error naming it."""
    if isinstance(data, list):
        return [from_json(v) for v in data]
    if not isinstance(data, dict):
        return data
    if "__type__" not in data:
        return {k: from_json(v) for k, v in data.items()}
    name = data["__type__"]
    if name not in VALUE_TYPES:
        raise ValueError(
            f"stored asset value of unknown type {name!r}; known: {sorted(VALUE_TYPES)}"
        )
    return VALUE_TYPES[name](**{k: from_json(v) for k, v in data.items() if k != "__type__"})


def scalars(value: Any) -> dict[str, int | float | str | bool]:
    """The scalar fields of a value (and of its metric dicts), for the Dagster UI."""
    data = to_json(value)
    if not isinstance(data, dict):
        return {}
    out: dict[str, int | float | str | bool] = {}
    for k, v in data.items():
        if k == "__type__":
            continue
        if isinstance(v, (int, float, str, bool)):
            out[k] = v
        elif isinstance(v, dict):
            out.update({mk: mv for mk, mv in v.items() if isinstance(mv, (int, float, str, bool))})
    return out
