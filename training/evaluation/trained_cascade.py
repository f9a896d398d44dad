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

from unclip.datasets import readers
from unclip.datasets.config import ClipConfig
from unclip.datasets.storage import StorageLayout, exists, read_json, write_json

from ..config import SHAPE_CAPTIONS, DecoderConfig, EvaluateConfig, PriorConfig, TrainerConfig
from ..engine.fit_result import FitResult
from .cascade_record import (
    DECODER_METRICS_FILE,
    REPORT_FILE,
    CascadeRuns,
    settings_of,
    stored_cascade_metrics,
)
from .metric_names import CASCADE_SUMMARY_NAMES, PRIOR_METRIC_NAMES, PRIOR_METRICS_FILE

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


def grid_captions(
    layout: StorageLayout,
    version: str,
    eval_cfg: EvaluateConfig,
    holdout_fraction: float,
    shapes: bool,
) -> list[str]:
    """The sample grid's captions: ``evaluate.captions``, else the shapes' (``shapes``: the
    synthetic set is on), else the first distinct held-out captions of dataset ``version``."""
    if eval_cfg.captions is not None:
        return list(eval_cfg.captions)
    if shapes:
        return list(SHAPE_CAPTIONS)
    manifest = readers.load_manifest(layout, version)
    return readers.holdout_captions(layout, manifest, holdout_fraction, len(SHAPE_CAPTIONS))


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
    prior_path = layout.join("eval", runs.prior.run_name, PRIOR_METRICS_FILE)
    prior_metrics = read_json(prior_path) if exists(prior_path) else {}
    # torch, open_clip and diffusers load only for what is not computed yet
    if prior_metrics_stale(prior_metrics, prior_cfg):
        from .prior_eval import evaluate_prior

        prior_metrics = evaluate_prior(
            layout, version, runs.prior, eval_cfg, holdout_fraction, prior_cfg=prior_cfg
        )
        _report(runs.prior, prior_cfg.trainer, _numbers(prior_metrics, PRIOR_METRIC_NAMES))
    grid = layout.join("eval", runs.decoder.run_name, "samples.png")
    if not exists(grid):
        from .prior_eval import write_sample_grid

        exports = (runs.prior.export_dir, runs.decoder.export_dir)
        captions = grid_captions(layout, version, eval_cfg, holdout_fraction, palette is not None)
        grid_cfg = eval_cfg.model_copy(update={"captions": captions})
        write_sample_grid(layout, clip_cfg, clip_checkpoint, *exports, grid_cfg, grid)
    later_stages: dict[str, Any] = {}
    if runs.upsampler is not None:
        later_stages["upsampler_exports"] = [runs.upsampler.export_dir]
    cascade_runs = CascadeRuns(
        runs.prior, runs.decoder, decoder_cfg, clip_cfg, clip_checkpoint, later_stages
    )
    eval_dir = layout.eval_dir(runs.decoder.run_name)
    decoder_metrics = stored_cascade_metrics(eval_dir, settings_of(eval_cfg, cascade_runs))
    if decoder_metrics is None:
        from .cascade_eval import CascadeEvalOptions, evaluate_cascade

        options = CascadeEvalOptions(
            palette=palette,
            prior_metrics=prior_metrics,
            loss_curves=_loss_curves(runs),
            extra_images={"Sample grid (evaluate.captions, prior → decoder)": grid},
        )
        decoder_metrics = evaluate_cascade(layout, version, cascade_runs, eval_cfg, options)
        summary = _numbers(decoder_metrics, CASCADE_SUMMARY_NAMES)
        _report(runs.decoder, decoder_cfg.trainer, summary, {"samples": grid})
    if runs.upsampler is not None:
        # The upsampler is judged by the same cascade metrics (the promotion gate reads them here).
        up_path = layout.join("eval", runs.upsampler.run_name, UPSAMPLER_METRICS_FILE)
        if not exists(up_path) or read_json(up_path) != decoder_metrics:
            write_json(up_path, decoder_metrics)
    return CascadeEvaluation(
        prior_metrics_path=prior_path,
        sample_grid=grid,
        decoder_metrics_path=f"{eval_dir}/{DECODER_METRICS_FILE}",
        report=f"{eval_dir}/{REPORT_FILE}",
        prior_metrics=_numbers(prior_metrics, PRIOR_METRIC_NAMES),
        cascade_metrics=_numbers(decoder_metrics, CASCADE_SUMMARY_NAMES),
    )


def _report(
    fit: FitResult,
    trainer: TrainerConfig,
    metrics: dict[str, float],
    images: dict[str, str] | None = None,
) -> None:
    """A fresh evaluation of ``fit`` into the trackers its training reported to."""
    from ..engine.trackers import report_evaluation

    report_evaluation(
        trainer.report_to, fit.run_dir, fit.run_name, trainer.max_steps, metrics, images
    )


def _loss_curves(runs: TrainedCascade) -> dict[str, str]:
    """The report's loss curves: model and run → ``loss.png`` of each trained stage."""
    fits = (("prior", runs.prior), ("decoder", runs.decoder), ("upsampler", runs.upsampler))
    return {
        f"{kind} {fit.run_name}": f"{fit.run_dir}/loss.png" for kind, fit in fits if fit is not None
    }


def _numbers(metrics: dict[str, Any], names: tuple[str, ...]) -> dict[str, float]:
    return {
        k: float(metrics[k])
        for k in names
        if isinstance(metrics.get(k), (int, float)) and not isinstance(metrics.get(k), bool)
    }
