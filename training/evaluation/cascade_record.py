"""What a cascade evaluation depends on and where it is kept, readable without torch: a rerun
finds a finished evaluation here and loads no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from unclip.datasets.config import ClipConfig
from unclip.datasets.storage import exists, read_json

from ..config import DecoderConfig, EvaluateConfig
from ..engine.fit_result import FitResult

DECODER_METRICS_FILE = "decoder_metrics.json"
REPORT_FILE = "report.html"


@dataclass(frozen=True)
class CascadeRuns:
    """The trained cascade an evaluation judges: its two runs and what they were made with."""

    prior_fit: FitResult
    decoder_fit: FitResult
    decoder_cfg: DecoderConfig
    clip_cfg: ClipConfig
    clip_checkpoint: str | None  # the CLIP of the embeddings (None: clip_cfg's pretrained)
    # extra keyword arguments of ``generate`` for the stages after the decoder (upsamplers)
    later_stages: dict[str, Any] = field(default_factory=dict)


def settings_of(cfg: EvaluateConfig, runs: CascadeRuns) -> dict[str, Any]:
    """What the metrics depend on: metrics written with other settings are recomputed."""
    return {
        "prior_run": runs.prior_fit.run_name,
        "decoder_run": runs.decoder_fit.run_name,
        "cascade": {k: str(v) for k, v in sorted(runs.later_stages.items())},
        "num_eval_samples": cfg.num_eval_samples,
        "sample_steps": cfg.eval_steps or runs.decoder_cfg.sample_steps,
        "guidance_scale": cfg.eval_guidance or runs.decoder_cfg.guidance_scale,
        "eval_seed": cfg.eval_seed,
        "inception_checkpoint": cfg.inception_checkpoint,
    }


def stored_cascade_metrics(out_dir: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The metrics in ``out_dir`` if they were computed with ``settings`` and their report is
    there, else None (never computed, or stale)."""
    path, report = f"{out_dir}/{DECODER_METRICS_FILE}", f"{out_dir}/{REPORT_FILE}"
    if not (exists(path) and exists(report)):
        return None
    old = read_json(path)
    return old if old.get("settings") == settings and "holdout_fraction" in old else None
