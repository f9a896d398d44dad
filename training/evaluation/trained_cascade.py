"""Evaluate one trained cascade (prior → decoder → upsampler when trained) on a dataset version.

Writes under ``eval/``: the prior's cosine suite (redone when it was drawn with other sampling
settings or lacks its context), a captioned sample grid, the cascade's metrics and HTML report
and, when an upsampler is trained, the same cascade metrics as the upsampler's (the promotion
gate reads each model's metrics from its own run). Each output is skipped when it is already
there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from unclip.datasets.config import ClipConfig
from unclip.datasets.storage import StorageLayout, exists, read_json, write_json

from ..config import DecoderConfig, EvaluateConfig, PriorConfig
from ..engine.trainer import FitResult
from .cascade_eval import METRICS_FILE, REPORT_FILE, evaluate_cascade
from .metric_names import CASCADE_SUMMARY_NAMES, PRIOR_METRIC_NAMES
from .prior_eval import PRIOR_METRICS, evaluate_prior, write_sample_grid

UPSAMPLER_METRICS_FILE = "upsampler_metrics.json"


@dataclass(frozen=True)
class TrainedCascade:
    """The finished runs of one cascade: the prior, the decoder, and the upsampler if any."""

    prior: FitResult
    decoder: FitResult
    upsampler: FitResult | None = None


@dataclass(frozen=True)
class CascadeEvaluation:
    """Where the evaluation wrote its files, and the headline metrics."""

    prior_metrics_path: str
    sample_grid: str
    decoder_metrics_path: str
    report: str
    prior_metrics: dict[str, float] = field(default_factory=dict)
    cascade_metrics: dict[str, float] = field(default_factory=dict)


def prior_metrics_stale(metrics: dict[str, Any], prior_cfg: PriorConfig) -> bool:
    """True when stored prior metrics cannot stand for ``prior_cfg``'s sampling.

    Sampling keys do not name the run, so metrics drawn with other settings are stale; metrics
    without their context (the split) cannot be compared at promotion.
    """
    sampling = {
        "sample_steps": prior_cfg.sample_steps,
        "guidance_scale": prior_cfg.guidance_scale,
        "candidates": prior_cfg.candidates,
    }
    return any(metrics.get(k) != v for k, v in sampling.items()) or "split" not in metrics


def evaluate_trained_cascade(
    layout: StorageLayout,
    version: str,
    clip: tuple[ClipConfig, str | None],
    runs: TrainedCascade,
    configs: tuple[PriorConfig, DecoderConfig, EvaluateConfig],
    holdout_fraction: float,
    palette: dict[str, tuple[int, int, int]] | None,
) -> CascadeEvaluation:
    """Prior cosine suite, sample grid, cascade metrics and report of ``runs`` on ``version``.

    ``clip`` is the CLIP config and checkpoint the data was embedded with; ``palette`` (colour
    name → RGB of the synthetic shapes) enables the attribute check.
    """
    clip_cfg, clip_checkpoint = clip
    prior_cfg, decoder_cfg, eval_cfg = configs
    prior_path = layout.join("eval", runs.prior.run_name, PRIOR_METRICS)
    prior_metrics = read_json(prior_path) if exists(prior_path) else {}
    if prior_metrics_stale(prior_metrics, prior_cfg):
        prior_metrics = evaluate_prior(
            layout, version, runs.prior, eval_cfg, holdout_fraction, prior_cfg=prior_cfg
        )
    grid = layout.join("eval", runs.decoder.run_name, "samples.png")
    if not exists(grid):
        exports = (runs.prior.export_dir, runs.decoder.export_dir)
        write_sample_grid(layout, clip_cfg, clip_checkpoint, *exports, eval_cfg, grid)
    cascade: dict[str, Any] = {}
    loss_curves = {
        f"{kind} {fit.run_name}": f"{fit.run_dir}/loss.png"
        for kind, fit in (
            ("prior", runs.prior),
            ("decoder", runs.decoder),
            ("upsampler", runs.upsampler),
        )
        if fit is not None
    }
    if runs.upsampler is not None:
        cascade["upsampler_exports"] = [runs.upsampler.export_dir]
    decoder_metrics = evaluate_cascade(
        layout,
        version,
        clip_cfg,
        clip_checkpoint,
        runs.prior,
        runs.decoder,
        decoder_cfg,
        eval_cfg,
        palette=palette,
        cascade=cascade,
        prior_metrics=prior_metrics,
        loss_curves=loss_curves,
        extra_images={"Sample grid (evaluate.captions, prior → decoder)": grid},
    )
    if runs.upsampler is not None:
        # The upsampler is judged by the same cascade metrics (the promotion gate reads them here).
        up_path = layout.join("eval", runs.upsampler.run_name, UPSAMPLER_METRICS_FILE)
        if not exists(up_path) or read_json(up_path) != decoder_metrics:
            write_json(up_path, decoder_metrics)
    eval_dir = layout.eval_dir(runs.decoder.run_name)
    return CascadeEvaluation(
        prior_metrics_path=prior_path,
        sample_grid=grid,
        decoder_metrics_path=f"{eval_dir}/{METRICS_FILE}",
        report=f"{eval_dir}/{REPORT_FILE}",
        prior_metrics=_numbers(prior_metrics, PRIOR_METRIC_NAMES),
        cascade_metrics=_numbers(decoder_metrics, CASCADE_SUMMARY_NAMES),
    )


def _numbers(metrics: dict[str, Any], names: tuple[str, ...]) -> dict[str, float]:
    return {
        k: float(metrics[k])
        for k in names
        if isinstance(metrics.get(k), (int, float)) and not isinstance(metrics.get(k), bool)
    }
