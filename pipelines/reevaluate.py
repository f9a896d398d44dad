"""Evaluate the promoted model again, the way a candidate was evaluated, for the promotion gate.

The promoted model's stored metrics come from the hold-out set of the dataset version it was
trained on; a candidate trained after a refresh was measured on another. This puts the promoted
model through the candidate's evaluation (same data version, hold-out split, CLIP and protocol)
with the evaluation code of ``unclip.training``, or says why it cannot (``NotComparable``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unclip.datasets.storage import StorageLayout, exists, read_json
from unclip.pipelines.config import PipelineConfig
from unclip.pipelines.promotion import NotComparable, Reevaluate, against_metrics
from unclip.training.engine.fit_result import export_info_file

INFO_FILES = {model: export_info_file(model) for model in ("prior", "decoder")}


@dataclass(frozen=True)
class _Rejudging:
    """The promoted run judged again on a candidate's evaluation, written to ``out``."""

    cfg: PipelineConfig
    layout: StorageLayout
    promoted: dict[str, Any]  # its registry record: run, export
    metrics: dict[str, Any]  # the candidate's: data version, split, protocol
    out: str


def reevaluator(cfg: PipelineConfig) -> Reevaluate:
    """The re-evaluation ``promotion.promote`` calls, for this pipeline's storage and CLIP."""

    def run(model: str, promoted: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
        return promoted_on_candidate(cfg, model, promoted, candidate)

    return run


def promoted_on_candidate(
    cfg: PipelineConfig,
    model: str,
    promoted: dict[str, Any],
    candidate: dict[str, Any],
) -> dict[str, Any]:
    """The promoted ``model``'s metrics on the candidate's evaluation; NotComparable if impossible."""
    layout = StorageLayout(cfg.storage)
    m = candidate["metrics"]
    if model not in INFO_FILES:
        raise NotComparable(f"a promoted {model} is not re-evaluated in another context")
    info_path = f"{promoted['export'].rstrip('/')}/{INFO_FILES[model]}"
    if not exists(info_path):
        raise NotComparable(f"the promoted export has no {info_path}: it cannot be re-evaluated")
    manifest = read_json(layout.manifest(str(m.get("data_version"))))
    info = read_json(info_path)
    if info.get("clip_id") != manifest["clip_id"]:
        raise NotComparable(
            f"the promoted {model} works in the space of CLIP {info.get('clip_id')}, the "
            f"candidate's data {m.get('data_version')} was embedded by CLIP {manifest['clip_id']}"
        )
    out = against_metrics(layout, model, candidate["run"], promoted["run"])
    if model == "prior":
        return _prior(_Rejudging(cfg, layout, promoted, m, out))
    return _decoder(_Rejudging(cfg, layout, promoted, m, out.rsplit("/", 1)[0]))


def _prior(job: _Rejudging) -> dict[str, Any]:
    from unclip.training.engine.fit_result import FitResult
    from unclip.training.evaluation.prior_eval import evaluate_prior

    cfg, m = job.cfg, job.metrics

    if m.get("split") != "holdout" or m.get("holdout_fraction") is None:
        raise NotComparable("the candidate's prior metrics do not say which hold-out split")
    fit = FitResult(job.promoted["run"], run_dir="", export_dir=job.promoted["export"])
    protocol = {k: m[k] for k in ("sample_steps", "guidance_scale", "candidates")}
    # num_pairs = min(held-out pairs, max_pairs): the same pairs when max_pairs is num_pairs.
    ev = cfg.evaluate.model_copy(update={"max_pairs": int(m["num_pairs"])})
    prior_cfg = cfg.prior.model_copy(update=protocol)
    holdout = float(m["holdout_fraction"])
    return evaluate_prior(
        job.layout, m["data_version"], fit, ev, holdout, prior_cfg=prior_cfg, out_path=job.out
    )


def _decoder(job: _Rejudging) -> dict[str, Any]:
    from unclip.datasets.synthetic import color_palette
    from unclip.training.engine.fit_result import EXPORT_DIRNAME, FitResult
    from unclip.training.engine.latest_runs import latest_export
    from unclip.training.evaluation.cascade_eval import CascadeEvalOptions, evaluate_cascade
    from unclip.training.evaluation.cascade_record import CascadeRuns

    cfg, layout, m = job.cfg, job.layout, job.metrics
    settings = m.get("settings") or {}
    if settings.get("cascade"):
        raise NotComparable("the candidate's cascade has later stages: not re-evaluated")
    if m.get("holdout_fraction") is None:
        raise NotComparable("the candidate's decoder metrics do not say which hold-out split")
    prior_run = str(settings.get("prior_run"))
    prior_export = f"{layout.run_dir('prior', prior_run)}/{EXPORT_DIRNAME}"
    prior_fit = FitResult(prior_run, run_dir="", export_dir=prior_export)
    decoder_fit = FitResult(job.promoted["run"], run_dir="", export_dir=job.promoted["export"])
    ev = cfg.evaluate.model_copy(
        update={
            "holdout_fraction": float(m["holdout_fraction"]),
            "num_eval_samples": settings["num_eval_samples"],
            "eval_steps": settings["sample_steps"],
            "eval_guidance": settings["guidance_scale"],
            "eval_seed": settings["eval_seed"],
            "inception_checkpoint": settings["inception_checkpoint"],
        }
    )
    # The candidate's data was embedded by the pinned CLIP (the clip ids were compared above).
    clip_checkpoint = latest_export(layout, "clip") if cfg.uses_bootstrap_clip else None
    runs = CascadeRuns(prior_fit, decoder_fit, cfg.decoder, cfg.clip, clip_checkpoint)
    palette = color_palette(cfg.synthetic) if cfg.synthetic is not None else None
    options = CascadeEvalOptions(palette=palette, out_dir=job.out)
    return evaluate_cascade(layout, m["data_version"], runs, ev, options)
