"""What the Dagster UI shows of an evaluation and a promotion: metrics, the report, the samples."""

from __future__ import annotations

import base64
from typing import Any

import dagster as dg

from unclip.datasets.storage import exists
from unclip.pipelines.values import PromotionOutcome, scalars
from unclip.training.evaluation.trained_cascade import CascadeEvaluation

# A sample grid larger than this is linked by its path, not drawn inline in the event log.
INLINE_IMAGE_BYTES = 1 << 20


def image_markdown(path: str, title: str) -> dg.MetadataValue:
    """The PNG at ``path`` (local or fsspec) inline as markdown, or its path when large/missing."""
    import fsspec

    if not exists(path):
        return dg.MetadataValue.md(f"*{title}: {path} does not exist*")
    with fsspec.open(path, "rb") as f:
        data = f.read(INLINE_IMAGE_BYTES + 1)
    if len(data) > INLINE_IMAGE_BYTES:
        return dg.MetadataValue.path(path)
    encoded = base64.b64encode(data).decode("ascii")
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{encoded})")


def evaluation_metadata(result: CascadeEvaluation) -> dict[str, Any]:
    """Every metric, the report's path and the captioned sample grid drawn inline."""
    return {
        **scalars(result),
        "report": dg.MetadataValue.path(result.report),
        "samples": image_markdown(result.sample_grid, "samples"),
    }


def promotion_metadata(outcomes: list[PromotionOutcome]) -> dict[str, Any]:
    """Per model: its decision and the run it concerns."""
    return {
        o.model: f"{'promoted' if o.promote else 'not promoted'} · {o.status} · {o.run}"
        for o in outcomes
    }
