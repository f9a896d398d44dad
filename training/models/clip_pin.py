"""The CLIP that embeds a storage root's data: the configured pretrained one, or the pinned
bootstrap CLIP.

The bootstrap CLIP is trained on the sources ingested when it is first needed, and
``runs/clip/latest.json`` pins it with those sources. Later sources are embedded with it rather
than retraining it (which would change ``clip_id`` and re-embed every source); unpinning (or
deleting that file) makes the next run train a new one on every source.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fsspec.core import url_to_fs

from unclip.datasets.config import ClipConfig
from unclip.datasets.storage import StorageLayout, exists, read_json, write_json

from ..config import BootstrapClipConfig
from ..engine.fit_result import finished_run
from .run_names import CLIP_KIND, bootstrap_clip_run_name


@dataclass(frozen=True)
class EmbeddingClip:
    """The CLIP the embeddings are filed under (``clip_id``) and its checkpoint (None: pretrained)."""

    clip_id: str
    checkpoint: str | None
    bootstrap: bool
    run: str | None = None
    skipped: bool = True
    trained_on_sources: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)


def embedding_clip_id(clip_cfg: ClipConfig, checkpoint: str | None) -> str:
    """The id the embeddings of this CLIP are filed under (loads the model once)."""
    from unclip.datasets.clip import load_clip

    return load_clip(clip_cfg, checkpoint).clip_id


def embedding_clip(
    layout: StorageLayout,
    clip_cfg: ClipConfig,
    boot: BootstrapClipConfig,
    holdout_fraction: float,
    ingested_sources: Callable[[], list[str]],
) -> EmbeddingClip:
    """The pretrained CLIP as configured, else the pinned bootstrap one (trained once, then kept).

    ``ingested_sources`` lists the fully ingested sources; it is asked only when no CLIP is pinned.
    """
    if clip_cfg.model_name is not None:
        return EmbeddingClip(embedding_clip_id(clip_cfg, None), None, bootstrap=False)
    pin_path = layout.latest_run("clip")
    pin = read_json(pin_path) if exists(pin_path) else {}
    trained_on = pin.get("sources") or ingested_sources()
    if not trained_on:
        raise ValueError(
            "the bootstrap CLIP trains on ingested pairs, and no source is ingested yet: "
            "materialize image_shards first (unclip ingest)"
        )
    name = bootstrap_clip_run_name(clip_cfg, boot, holdout_fraction, trained_on)
    fit = finished_run(layout, CLIP_KIND, name)
    if fit is None:  # torch and open_clip load only when there is training to do
        from .bootstrap_clip import train_bootstrap_clip

        fit = train_bootstrap_clip(layout, clip_cfg, boot, trained_on, holdout_fraction)
    clip_id = pin.get("clip_id")
    if pin.get("run") != fit.run_name or not clip_id:
        clip_id = embedding_clip_id(clip_cfg, fit.export_dir)
        write_json(
            pin_path,
            {
                "run": fit.run_name,
                "export": fit.export_dir,
                "dataset_version": None,
                "sources": sorted(trained_on),
                "clip_id": clip_id,
            },
        )
    scalars = {k: v for k, v in fit.metrics.items() if isinstance(v, (int, float, str, bool))}
    return EmbeddingClip(
        clip_id,
        fit.export_dir,
        bootstrap=True,
        run=fit.run_name,
        skipped=fit.skipped,
        trained_on_sources=len(trained_on),
        metrics=scalars,
    )


def unpin_clip(layout: StorageLayout) -> bool:
    """Forget the pinned bootstrap CLIP, so the next run trains one on every source."""
    path = layout.latest_run("clip")
    if not exists(path):
        return False
    fs, p = url_to_fs(path)
    fs.rm(p)
    return True
