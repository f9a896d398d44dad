"""Each model's run name, computed without torch: a rerun of a finished pipeline finds its runs
finished (and skips them) before any model code loads.

The task classes name their runs with these functions too, so there is one formula per model.
"""

from __future__ import annotations

import hashlib
import json

from unclip.datasets.config import ClipConfig
from unclip.datasets.storage import StorageLayout

from ..config import BootstrapClipConfig, IdentitySection
from ..engine.fit_result import FitResult, finished_run, run_name_for

CLIP_KIND = "clip"


def sources_version(source_ids: list[str]) -> str:
    """A data version for a set of sources (their ids are content hashes already)."""
    return hashlib.sha256(json.dumps(sorted(source_ids)).encode()).hexdigest()[:16]


def bootstrap_clip_run_name(
    clip_cfg: ClipConfig, boot: BootstrapClipConfig, holdout_fraction: float, source_ids: list[str]
) -> str:
    """The bootstrap CLIP's run: its config, the sources it trains on, the hold-out and seed."""
    return run_name_for(
        CLIP_KIND,
        clip_cfg,
        boot,
        holdout_fraction,
        data_version=sources_version(source_ids),
        seed=boot.trainer.seed,
    )


def manifest_run_name(
    kind: str,
    cfg: IdentitySection,
    holdout_fraction: float,
    version: str,
    init_digest: str | None = None,
) -> str:
    """A model trained on a dataset version; ``init_digest`` names the weights it starts from."""
    start = [{"init_weights": init_digest}] if init_digest else []
    return run_name_for(
        kind, cfg, holdout_fraction, *start, data_version=version, seed=cfg.trainer.seed
    )


def finished_manifest_run(
    layout: StorageLayout, kind: str, cfg: IdentitySection, holdout_fraction: float, version: str
) -> FitResult | None:
    """The finished run of ``kind`` on ``version``, or None: not finished, or named by starting
    weights that only loading them reveals (a fine-tuned prior's ``init_from``)."""
    if getattr(cfg, "init_from", None) is not None:
        return None
    return finished_run(layout, kind, manifest_run_name(kind, cfg, holdout_fraction, version))
