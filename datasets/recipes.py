"""Filter recipes applied when a manifest is made: which rows of each partition it leaves out.

A recipe (:class:`FilterRecipe`) is a set of filters that must all pass: caption length, the
original image size, score thresholds or top fractions (a top fraction is resolved to one
threshold over every row the manifest covers, as DataComp does), and DataComp's image-based
filtering through the semantic-dedup centroids. Semantic dedup's removal lists are one more
filter. Each removed row is named with the first filter it fails; each partition gets the
fraction of its rows each filter keeps on its own and the fraction all keep together, which is
how recipes are compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from .curation_config import FilterRecipe, ScoreFilter

SEMANTIC_DEDUP = "semantic_dedup"
KEPT = "kept"


@dataclass
class PartitionInput:
    """What the filters see of one partition."""

    scores: pa.Table  # scores.partition_scores
    semdedup_removed: set[str] | None = None  # keys of its removal list, when dedup applies
    near_reference: np.ndarray | None = None  # bool per row, for clusters_near


@dataclass
class RecipeResult:
    """Per partition: removed keys with their filter, and kept fractions by filter."""

    removed: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    kept_fractions: dict[str, dict[str, float]] = field(default_factory=dict)
    resolved: dict[str, Any] = field(default_factory=dict)  # thresholds: part of the version


def _filter_name(f: ScoreFilter) -> str:
    parts = [f.score]
    if f.min is not None:
        parts.append(f">={f.min:g}")
    if f.max is not None:
        parts.append(f"<={f.max:g}")
    if f.top_fraction is not None:
        parts.append(f" top {f.top_fraction:g}")
    return "".join(parts)


def _top_threshold(values: list[np.ndarray], fraction: float) -> float:
    """The score at which the top ``fraction`` of all values starts (ties kept)."""
    v = np.concatenate(values).astype(np.float64) if values else np.zeros(0)
    v = v[~np.isnan(v)]
    if not len(v):
        return -math.inf
    k = max(1, math.ceil(fraction * len(v)))
    return float(np.partition(v, len(v) - k)[len(v) - k])


def _score(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


def _numbers(table: pa.Table, name: str) -> np.ndarray:
    """An integer column with nulls as NaN (an unknown size passes no size filter)."""
    return np.array([np.nan if v is None else v for v in table.column(name).to_pylist()], float)


def _masks(
    recipe: FilterRecipe | None, part: PartitionInput, thresholds: dict[str, float]
) -> dict[str, np.ndarray]:
    t = part.scores
    masks: dict[str, np.ndarray] = {}
    if part.semdedup_removed is not None:
        keys = t.column("key").to_pylist()
        masks[SEMANTIC_DEDUP] = np.array([k not in part.semdedup_removed for k in keys], bool)
    if recipe is None:
        return masks
    captions = [c or "" for c in t.column("caption").to_pylist()]
    if recipe.caption_min_words:
        words = np.array([len(c.split()) for c in captions])
        masks["caption_min_words"] = words >= recipe.caption_min_words
    if recipe.caption_min_chars:
        chars = np.array([len(c.strip()) for c in captions])
        masks["caption_min_chars"] = chars >= recipe.caption_min_chars
    if recipe.min_image_side or recipe.max_aspect_ratio is not None:
        w, h = _numbers(t, "original_width"), _numbers(t, "original_height")
        with np.errstate(invalid="ignore", divide="ignore"):
            if recipe.min_image_side:
                masks["min_image_side"] = np.fmin(w, h) >= recipe.min_image_side
            if recipe.max_aspect_ratio is not None:
                ratio = np.fmax(w, h) / np.fmin(w, h)
                masks["max_aspect_ratio"] = ratio <= recipe.max_aspect_ratio
    for f in recipe.scores:
        s = _score(t, f.score)
        keep = ~np.isnan(s)
        if f.min is not None:
            keep &= s >= f.min
        if f.max is not None:
            keep &= s <= f.max
        if f.top_fraction is not None:
            keep &= s >= thresholds[_filter_name(f)]
        masks[_filter_name(f)] = keep
    if recipe.clusters_near is not None:
        if part.near_reference is None:
            raise ValueError(
                "recipe clusters_near needs semantic dedup's centroids: run curate first"
            )
        masks["clusters_near"] = part.near_reference
    return masks


def apply_recipe(recipe: FilterRecipe | None, parts: dict[str, PartitionInput]) -> RecipeResult:
    """Which rows of each partition the recipe (and semantic dedup) leaves out, and why."""
    thresholds: dict[str, float] = {}
    for f in recipe.scores if recipe is not None else []:
        if f.top_fraction is not None:
            values = [_score(p.scores, f.score) for p in parts.values()]
            thresholds[_filter_name(f)] = _top_threshold(values, f.top_fraction)
    result = RecipeResult(resolved={"top_fraction_thresholds": thresholds})
    for name, part in parts.items():
        masks = _masks(recipe, part, thresholds)
        n = part.scores.num_rows
        keys = part.scores.column("key").to_pylist()
        reason = [None] * n
        for filter_name, m in masks.items():  # the first filter that fails names the row
            for i in np.flatnonzero(~m):
                reason[i] = reason[i] or filter_name
        result.removed[name] = [(k, r) for k, r in zip(keys, reason, strict=True) if r]
        fractions = {f: float(m.mean()) if n else 1.0 for f, m in masks.items()}
        fractions[KEPT] = 1.0 - len(result.removed[name]) / n if n else 1.0
        result.kept_fractions[name] = fractions
    return result


def format_kept_table(kept_fractions: dict[str, dict[str, float]]) -> str:
    """Kept fractions by filter as a plain-text table, one partition a row."""
    filters = sorted({f for row in kept_fractions.values() for f in row if f != KEPT}) + [KEPT]
    head = ["partition", *filters]
    rows = [
        [name, *(f"{row[f]:.3f}" if f in row else "-" for f in filters)]
        for name, row in sorted(kept_fractions.items())
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows]
    )
