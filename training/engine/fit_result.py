"""Training runs as records, importable without torch or Ray: a run's name (a content hash of
what it trains on), the marker a finished run leaves, and what a run produced.

A rerun of a finished pipeline finds every run finished here, before any model code loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from unclip.datasets.storage import StorageLayout, exists, read_json

from ..config import IdentitySection

log = logging.getLogger(__name__)

EXPORT_DIRNAME = "export"
EXPORT_MARKER = "fit.json"  # written last into the export: its presence means the run is finished


def export_info_file(model_kind: str) -> str:
    """The json beside the model in a ``model_kind`` export: dimension, CLIP id, sampling defaults."""
    return f"unclip_{model_kind}.json"


@dataclass
class FitResult:
    """What a training run produced; ``skipped`` when it had finished before."""

    run_name: str
    run_dir: str
    export_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False


def run_name_for(kind: str, *configs: Any, data_version: str, seed: int) -> str:
    """``kind`` plus a short content hash of configs, data version and seed: same inputs, same run."""
    parts = [
        c.identity()
        if isinstance(c, IdentitySection)
        else c.model_dump(mode="json")
        if isinstance(c, BaseModel)
        else c
        for c in configs
    ]
    blob = json.dumps(
        {"configs": parts, "data_version": data_version, "seed": seed},
        sort_keys=True,
        default=str,
    )
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def completed_fit(export_dir: str) -> dict[str, Any] | None:
    """The export marker of a finished run, or None."""
    marker = f"{export_dir}/{EXPORT_MARKER}"
    return read_json(marker) if exists(marker) else None


def finished_run(layout: StorageLayout, model_kind: str, run_name: str) -> FitResult | None:
    """The result of run ``run_name`` if it finished before (nothing to train), else None."""
    run_dir = layout.run_dir(model_kind, run_name)
    export_dir = f"{run_dir}/{EXPORT_DIRNAME}"
    done = completed_fit(export_dir)
    if done is None:
        return None
    log.info("run %s finished before; nothing to train", run_name)
    return FitResult(run_name, run_dir, export_dir, done.get("metrics", {}), skipped=True)
