"""Decoder / whole-cascade evaluation → ``eval/{decoder_run}/decoder_metrics.json`` + ``report.html``.

On captions drawn from the held-out split (single-object ones on the synthetic shapes), the
cascade (``UnclipPipeline``: CLIP text → prior → decoder → upsampler when there is one)
draws ``num_eval_samples`` images, spread over ``eval_workers`` Ray tasks. Each task returns
its images and their features; every Fréchet distance is computed once, on the features
pooled from all tasks, never as an average of per-task scores. The same is done with a
freshly initialized decoder of the same config, the baseline FD-CLIP is judged against.

Every metric is written with its protocol (what features, which weights by sha256, how the
images were resized, how many samples) under ``protocols`` in the JSON and in the report: a
number is only comparable with another computed the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from unclip.datasets import readers
from unclip.datasets.clip import encode_images, encode_texts, load_clip
from unclip.datasets.config import ClipConfig
from unclip.datasets.storage import StorageLayout, write_json

from ..config import EvaluateConfig
from . import image_metrics as im
from .cascade_generation import export_untrained_decoder, run_chunks, split
from .cascade_record import (
    DECODER_METRICS_FILE,
    REPORT_FILE,
    CascadeRuns,
    settings_of,
    stored_cascade_metrics,
)
from .inception_metrics import FidInception, inception_scores, load_fid_inception
from .report import write_report

log = logging.getLogger(__name__)

UNTRAINED_DIR = "untrained_decoder"

# The quality goals of the cascade on the synthetic shapes.
GOAL_ATTRIBUTE_ACCURACY = 0.8
GOAL_FD_RATIO = 1 / 3  # fd_clip / fd_clip_untrained at most
GOAL_CLIP_SCORE_RATIO = 0.9  # clip_score / clip_score_real at least


@dataclass
class HeldOut:
    """The evaluation's caption set and the real held-out images it is compared with."""

    captions: list[str]  # num_eval_samples captions, cycled from the held-out ones
    real_images: np.ndarray  # uint8 [M, H, W, 3] at the data's resolution
    real_captions: list[str]


def held_out_set(
    layout: StorageLayout,
    version: str,
    holdout_fraction: float,
    n: int,
    palette: dict[str, im.RGB] | None,
) -> HeldOut:
    """Held-out pairs (single-object captions only, when there is a palette); captions cycled to ``n``."""
    manifest = readers.load_manifest(layout, version)
    pairs = readers.load_image_pairs(layout, manifest, "holdout", holdout_fraction)
    keep = [
        i
        for i, c in enumerate(pairs.captions)
        if palette is None or im.parse_caption(c, list(palette)) is not None
    ]
    if len(keep) < 2:
        raise ValueError(
            f"dataset {version} has {len(keep)} usable held-out pairs at "
            f"holdout_fraction={holdout_fraction}: the evaluation needs at least 2"
        )
    captions = [pairs.captions[i] for i in keep]
    return HeldOut(
        captions=[captions[i % len(captions)] for i in range(n)],
        real_images=pairs.images[keep],
        real_captions=captions,
    )


def resize_all(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, W, 3] → [N, size, size, 3] (bicubic, as the training reader resizes)."""
    if images.shape[1:3] == (size, size):
        return images
    return np.stack(
        [
            np.asarray(Image.fromarray(x).resize((size, size), Image.Resampling.BICUBIC))
            for x in images
        ]
    )


# --- the step ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CascadeEvalOptions:
    """What the report adds and where it goes; none of it changes a metric."""

    palette: dict[str, im.RGB] | None = (
        None  # colour → RGB of the synthetic shapes: attribute check
    )
    prior_metrics: dict[str, Any] | None = None
    loss_curves: dict[str, str] = field(default_factory=dict)  # model → loss-curve PNG path
    extra_images: dict[str, str] = field(default_factory=dict)  # label → PNG path
    out_dir: str | None = None  # default eval/{decoder_run}; a promoted decoder judged elsewhere


def evaluate_cascade(
    layout: StorageLayout,
    version: str,
    runs: CascadeRuns,
    cfg: EvaluateConfig,
    options: CascadeEvalOptions | None = None,
) -> dict[str, Any]:
    """Metrics of the whole cascade on held-out captions → ``eval/{decoder_run}/decoder_metrics.json``
    and ``report.html`` beside it.

    Does nothing when the metrics of the same runs and settings are already there; the JSON is
    written last, so a killed step leaves no metrics without their report.
    """
    options = options or CascadeEvalOptions()
    out_dir = options.out_dir or layout.eval_dir(runs.decoder_fit.run_name)
    path = f"{out_dir}/{DECODER_METRICS_FILE}"
    report = f"{out_dir}/{REPORT_FILE}"
    settings = settings_of(cfg, runs)
    old = stored_cascade_metrics(out_dir, settings)
    if old is not None:
        return old
    held = held_out_set(
        layout, version, cfg.holdout_fraction, cfg.num_eval_samples, options.palette
    )
    untrained = export_untrained_decoder(
        layout,
        version,
        runs.decoder_cfg,
        cfg.holdout_fraction,
        runs.decoder_fit.export_dir,
        f"{out_dir}/{UNTRAINED_DIR}_seed{cfg.eval_seed}",
        cfg.eval_seed,
    )
    trained, baseline = generate_both(runs, cfg, settings, held.captions, untrained)
    metrics, samples = cascade_metrics(runs, cfg, held, trained, baseline, options.palette)
    metrics.update(
        num_workers=len(trained),
        data_version=version,
        holdout_fraction=cfg.holdout_fraction,
        prior_run=runs.prior_fit.run_name,
        decoder_run=runs.decoder_fit.run_name,
        sample_steps=settings["sample_steps"],
        guidance_scale=settings["guidance_scale"],
        settings=settings,
    )
    if samples["matches"] is not None:
        metrics["attribute_accuracy_untrained"] = im.attribute_accuracy(
            im.attribute_matches(samples["untrained"], held.captions, options.palette)
        )
    metrics["goals"] = goals(metrics)
    write_report(
        report,
        f"unclip evaluation: {runs.decoder_fit.run_name}",
        metrics,
        samples,
        options.prior_metrics,
        options.loss_curves,
        options.extra_images,
    )
    write_json(path, metrics)
    return metrics


def generate_both(
    runs: CascadeRuns,
    cfg: EvaluateConfig,
    settings: dict[str, Any],
    captions: list[str],
    untrained_export: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(trained, untrained) cascades' chunk results on the same captions and seeds, in Ray tasks."""
    common = {
        "clip_cfg": runs.clip_cfg,
        "clip_checkpoint": runs.clip_checkpoint,
        "prior_export": runs.prior_fit.export_dir,
        "steps": settings["sample_steps"],
        "guidance": settings["guidance_scale"],
        "cascade": dict(runs.later_stages),
        "inception_checkpoint": cfg.inception_checkpoint,
    }
    chunks = split(captions, cfg.eval_workers)
    jobs = [
        {**common, "decoder_export": export, "captions": c, "seed": cfg.eval_seed + off}
        for export in (runs.decoder_fit.export_dir, untrained_export)
        for off, c in chunks
    ]
    results = run_chunks(jobs, cfg.device)
    return results[: len(chunks)], results[len(chunks) :]


def cascade_metrics(
    runs: CascadeRuns,
    cfg: EvaluateConfig,
    held: HeldOut,
    trained: list[dict[str, Any]],
    baseline: list[dict[str, Any]],
    palette: dict[str, im.RGB] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, the report's sample grids) from the pooled chunk results of both cascades."""
    images = np.concatenate([r["images"] for r in trained])
    size = images.shape[1]
    real = resize_all(held.real_images, size)
    bundle = load_clip(runs.clip_cfg, runs.clip_checkpoint)
    real_feats = encode_images(bundle, [Image.fromarray(x) for x in real])
    gen_text = encode_texts(bundle, held.captions)
    real_text = encode_texts(bundle, held.real_captions)
    gen_feats = np.concatenate([r["clip"] for r in trained])

    inception = load_fid_inception(cfg.inception_checkpoint) if cfg.inception_checkpoint else None
    matches = im.attribute_matches(images, held.captions, palette) if palette else None
    metrics: dict[str, Any] = {
        "attribute_accuracy": im.attribute_accuracy(matches) if matches else None,
        "fd_clip": im.pooled_fd([r["clip"] for r in trained], real_feats),
        "fd_clip_untrained": im.pooled_fd([r["clip"] for r in baseline], real_feats),
        # the decoder's images upsampled bilinearly: what an upsampler has to beat
        "fd_clip_bilinear": (
            im.pooled_fd([r["clip_bilinear"] for r in trained], real_feats)
            if "clip_bilinear" in trained[0]
            else None
        ),
        "clip_score": float(im.clip_scores(gen_feats, gen_text).mean()),
        "clip_score_real": float(im.clip_scores(real_feats, real_text).mean()),
        **inception_scores(inception, real, trained, baseline),
        "num_samples": len(images),
        "num_real": len(real),
        "image_size": size,
    }
    metrics["protocols"] = protocols(
        metrics, inception, runs.clip_cfg, len(images), len(real), size, palette is not None
    )
    samples = {
        "images": images,
        "captions": held.captions,
        "matches": matches,
        "untrained": np.concatenate([r["images"] for r in baseline]),
        "real": real,
        "real_captions": held.real_captions,
    }
    return metrics, samples


def protocols(
    m: dict[str, Any],
    inception: FidInception | None,
    clip_cfg: ClipConfig,
    num_generated: int,
    num_real: int,
    image_size: int,
    shapes: bool,
) -> dict[str, dict[str, Any]]:
    """How each metric in ``m`` was computed, keyed by the metric's name."""
    real_resize = f"real images resized to the generated {image_size}px first (PIL bicubic, uint8)"
    counts = {"num_generated": num_generated, "num_real": num_real}
    clip = {
        "features": "L2-normalized CLIP image embeddings of the run's CLIP",
        "clip_model": clip_cfg.model_name or "bootstrap (trained on the ingested pairs)",
        "clip_pretrained": clip_cfg.pretrained,
        "resize": f"the CLIP's own preprocessing; {real_resize}",
        **counts,
    }
    out: dict[str, dict[str, Any]] = {
        "fd_clip": {**clip, "formula": "Fréchet distance of the pooled features"},
        "clip_score": {
            **clip,
            "formula": "mean of 100*max(cos(image, caption), 0) over generated images",
        },
        "clip_score_real": {
            **clip,
            "formula": "mean of 100*max(cos(image, caption), 0) over real held-out pairs",
        },
    }
    out["fd_clip_untrained"] = out["fd_clip"]
    out["fd_clip_bilinear"] = {
        **out["fd_clip"],
        "images": "the decoder's own images before the upsampler, upsampled bilinearly instead",
    }
    if inception is not None:
        fid = {**inception.protocol(num_generated, num_real), "real_images": real_resize}
        kid = {**fid, "formula": "unbiased MMD², kernel (x·y/2048 + 1)³, whole sets up to 1000"}
        out |= {"fid": {**fid, "formula": "Fréchet distance of the pooled features"}}
        out |= {"fid_untrained": out["fid"], "kid": kid, "kid_untrained": kid}
    if shapes:
        out["attribute_accuracy"] = {
            "formula": "fraction of single-object captions whose colour and shape the image shows",
            "num_generated": num_generated,
        }
    return {k: v for k, v in out.items() if m.get(k) is not None}


def goals(m: dict[str, Any]) -> dict[str, Any]:
    """The quality goals, each as ``{value, target, met}`` (met is None when not measurable)."""
    fd_ratio = m["fd_clip"] / m["fd_clip_untrained"] if m["fd_clip_untrained"] else None
    clip_ratio = m["clip_score"] / m["clip_score_real"] if m["clip_score_real"] else None
    acc = m["attribute_accuracy"]
    out: dict[str, Any] = {
        "attribute_accuracy": {
            "value": acc,
            "target": f">= {GOAL_ATTRIBUTE_ACCURACY}",
            "met": None if acc is None else acc >= GOAL_ATTRIBUTE_ACCURACY,
        },
        "fd_clip_ratio": {
            "value": fd_ratio,
            "target": "<= 1/3",
            "met": None if fd_ratio is None else fd_ratio <= GOAL_FD_RATIO,
        },
        "clip_score_ratio": {
            "value": clip_ratio,
            "target": f">= {GOAL_CLIP_SCORE_RATIO}",
            "met": None if clip_ratio is None else clip_ratio >= GOAL_CLIP_SCORE_RATIO,
        },
    }
    if m.get("fd_clip_bilinear") is not None:  # a cascade with an upsampler
        ratio = m["fd_clip"] / m["fd_clip_bilinear"] if m["fd_clip_bilinear"] else None
        out["fd_clip_vs_bilinear"] = {
            "value": ratio,
            "target": "<= 1 (the upsampler at least as good as bilinear upsampling)",
            "met": None if ratio is None else ratio <= 1.0,
        }
    return out
