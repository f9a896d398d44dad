"""Decoder / whole-cascade evaluation → ``eval/{decoder_run}/decoder_metrics.json`` + ``report.html``.

On captions drawn from the held-out split (single-object ones on the synthetic shapes), the
cascade (``sampling.generate``: CLIP text → prior → decoder → upsampler when there is one)
draws ``num_eval_samples`` images, spread over ``eval_workers`` Ray tasks. Each task returns
its images and their features; every Fréchet distance is computed once, on the features
pooled from all tasks, never as an average of per-task scores. The same is done with a
freshly initialized decoder of the same config, the baseline FD-CLIP is judged against.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from unclip.datasets import readers
from unclip.datasets.clip import encode_images, encode_texts, load_clip
from unclip.datasets.config import ClipConfig
from unclip.datasets.ray_runtime import ensure_started
from unclip.datasets.storage import StorageLayout, exists, read_json, write_json

from ..config import DecoderConfig, EvaluateConfig
from ..engine.artifacts import publish_dir
from ..engine.trainer import FitResult
from ..models.decoder import DecoderTask
from ..sampling import generate
from . import image_metrics as im
from .report import write_report

log = logging.getLogger(__name__)

METRICS_FILE = "decoder_metrics.json"
REPORT_FILE = "report.html"
UNTRAINED_DIR = "untrained_decoder"
UNTRAINED_MARKER = "untrained.json"

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


# --- FID (torchmetrics, optional) ------------------------------------------------------------


class _InceptionFeatures(torch.nn.Module):
    """torchvision Inception-v3's 2048-d pool features of uint8 images (resized to 299, ImageNet-normalized)."""

    num_features = 2048

    def __init__(self, checkpoint: str) -> None:
        super().__init__()
        import fsspec
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=True, init_weights=False)
        with fsspec.open(checkpoint, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        net.fc = torch.nn.Identity()
        self.net = net.eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(x.float() / 255.0, size=(299, 299), mode="bilinear")
        return self.net((x - self.mean) / self.std)


def fid_metric(checkpoint: str) -> Any:
    """A torchmetrics ``FrechetInceptionDistance`` on the configured Inception weights."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as e:
        raise ImportError(
            "evaluate.inception_checkpoint is set but torchmetrics is not installed: "
            "pip install 'unclip[eval]'"
        ) from e
    if not exists(checkpoint):
        raise FileNotFoundError(f"evaluate.inception_checkpoint {checkpoint} does not exist")
    return FrechetInceptionDistance(feature=_InceptionFeatures(checkpoint))


def fid_state(images: np.ndarray, checkpoint: str, real: bool) -> dict[str, torch.Tensor]:
    """One worker's FID sufficient statistics (feature sum, Σxxᵀ, count): they add up exactly."""
    metric = fid_metric(checkpoint)
    metric.update(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), real=real)
    return {k: v.clone() for k, v in metric.metric_state.items()}


def pooled_fid(real: np.ndarray, states: list[dict[str, torch.Tensor]], checkpoint: str) -> float:
    """FID of the real images against the sums of all workers' statistics (= all features at once)."""
    metric = fid_metric(checkpoint)
    metric.update(torch.from_numpy(real).permute(0, 3, 1, 2).contiguous(), real=True)
    for s in states:
        metric.merge_state(s)
    return float(metric.compute())


# --- generation in Ray tasks ------------------------------------------------------------------


def generate_chunk(
    captions: list[str],
    seed: int,
    clip_cfg: ClipConfig,
    clip_checkpoint: str | None,
    prior_export: str,
    decoder_export: str,
    steps: int | None,
    guidance: float | None,
    cascade: dict[str, Any],
    inception_checkpoint: str | None,
) -> dict[str, Any]:
    """One worker's share: images, their CLIP image features, their FID statistics."""
    images = generate(
        captions,
        clip_cfg,
        clip_checkpoint,
        prior_export,
        decoder_export,
        steps=steps,
        guidance=guidance,
        seed=seed,
        **cascade,
    )
    arr = np.stack([np.asarray(x.convert("RGB")) for x in images])
    bundle = load_clip(clip_cfg, clip_checkpoint)
    return {
        "images": arr,
        "clip": encode_images(bundle, images),
        "fid": fid_state(arr, inception_checkpoint, real=False) if inception_checkpoint else None,
    }


def split(items: list[str], parts: int) -> list[tuple[int, list[str]]]:
    """``(offset, chunk)`` pairs of about equal size, in order."""
    bounds = np.linspace(0, len(items), min(parts, len(items)) + 1).round().astype(int)
    return [(int(a), items[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def run_chunks(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``generate_chunk(**job)`` for every job as Ray tasks (one CPU each); results in order."""
    import ray

    ensure_started()
    task = ray.remote(num_cpus=1, max_retries=1)(generate_chunk)
    return ray.get([task.remote(**job) for job in jobs])


def export_untrained_decoder(
    layout: StorageLayout,
    version: str,
    cfg: DecoderConfig,
    holdout_fraction: float,
    trained_export: str,
    target: str,
    seed: int,
) -> str:
    """A freshly initialized (seeded) decoder of the trained one's config, exported for the workers.

    Its embedding dimension and CLIP id are the trained export's, so it fits the same cascade.
    """
    if exists(f"{target}/{UNTRAINED_MARKER}"):
        return target
    info = read_json(f"{trained_export.rstrip('/')}/{DecoderTask.INFO_FILE}")
    task = DecoderTask(
        layout=layout,
        manifest_version=version,
        cfg=cfg,
        holdout_fraction=holdout_fraction,
        dim=int(info["embedding_dim"]),
        clip_id=str(info["clip_id"]),
    )
    torch.manual_seed(seed)
    model = task.build_model()
    with tempfile.TemporaryDirectory(prefix="unclip-untrained-") as d:
        task.export(model, d)
        publish_dir(d, target, UNTRAINED_MARKER, {"seed": seed, "untrained": True})
    return target


# --- the step ---------------------------------------------------------------------------------


def settings_of(
    cfg: EvaluateConfig,
    decoder_cfg: DecoderConfig,
    prior_fit: FitResult,
    decoder_fit: FitResult,
    cascade: dict[str, Any],
) -> dict[str, Any]:
    """What the metrics depend on: metrics written with other settings are recomputed."""
    return {
        "prior_run": prior_fit.run_name,
        "decoder_run": decoder_fit.run_name,
        "cascade": {k: str(v) for k, v in sorted(cascade.items())},
        "num_eval_samples": cfg.num_eval_samples,
        "sample_steps": cfg.eval_steps or decoder_cfg.sample_steps,
        "guidance_scale": cfg.eval_guidance or decoder_cfg.guidance_scale,
        "eval_seed": cfg.eval_seed,
        "inception_checkpoint": cfg.inception_checkpoint,
    }


def evaluate_cascade(
    layout: StorageLayout,
    version: str,
    clip_cfg: ClipConfig,
    clip_checkpoint: str | None,
    prior_fit: FitResult,
    decoder_fit: FitResult,
    decoder_cfg: DecoderConfig,
    cfg: EvaluateConfig,
    palette: dict[str, im.RGB] | None,
    cascade: dict[str, Any] | None = None,
    prior_metrics: dict[str, Any] | None = None,
    loss_curves: dict[str, str] | None = None,
    extra_images: dict[str, str] | None = None,
    out_dir: str | None = None,
) -> dict[str, Any]:
    """Metrics of the whole cascade on held-out captions → ``eval/{decoder_run}/decoder_metrics.json``
    and ``report.html`` beside it.

    ``palette`` (colour name → RGB of the synthetic shapes) enables the attribute check;
    ``cascade`` holds the extra keyword arguments of ``generate`` for later stages (upsampler).
    ``prior_metrics``, ``loss_curves`` and ``extra_images`` (label → PNG path) go into the report.
    Does nothing when the metrics of the same runs and settings are already there; the JSON is
    written last, so a killed step leaves no metrics without their report. ``out_dir`` writes
    them elsewhere (a promoted decoder judged in a newer candidate's context).
    """
    cascade = dict(cascade or {})
    out_dir = out_dir or layout.eval_dir(decoder_fit.run_name)
    path = f"{out_dir}/{METRICS_FILE}"
    report = f"{out_dir}/{REPORT_FILE}"
    settings = settings_of(cfg, decoder_cfg, prior_fit, decoder_fit, cascade)
    if exists(path) and exists(report):
        old = read_json(path)
        if old.get("settings") == settings and "holdout_fraction" in old:
            return old
    held = held_out_set(layout, version, cfg.holdout_fraction, cfg.num_eval_samples, palette)
    untrained = export_untrained_decoder(
        layout,
        version,
        decoder_cfg,
        cfg.holdout_fraction,
        decoder_fit.export_dir,
        f"{out_dir}/{UNTRAINED_DIR}_seed{cfg.eval_seed}",
        cfg.eval_seed,
    )
    common = {
        "clip_cfg": clip_cfg,
        "clip_checkpoint": clip_checkpoint,
        "prior_export": prior_fit.export_dir,
        "steps": settings["sample_steps"],
        "guidance": settings["guidance_scale"],
        "cascade": cascade,
        "inception_checkpoint": cfg.inception_checkpoint,
    }
    chunks = split(held.captions, cfg.eval_workers)
    jobs = [
        {**common, "decoder_export": export, "captions": c, "seed": cfg.eval_seed + off}
        for export in (decoder_fit.export_dir, untrained)
        for off, c in chunks
    ]
    results = run_chunks(jobs)
    trained, baseline = results[: len(chunks)], results[len(chunks) :]

    images = np.concatenate([r["images"] for r in trained])
    size = images.shape[1]
    real = resize_all(held.real_images, size)
    bundle = load_clip(clip_cfg, clip_checkpoint)
    real_feats = encode_images(bundle, [Image.fromarray(x) for x in real])
    gen_text = encode_texts(bundle, held.captions)
    real_text = encode_texts(bundle, held.real_captions)
    gen_feats = np.concatenate([r["clip"] for r in trained])

    fid = fid_untrained = None
    if cfg.inception_checkpoint:
        fid = pooled_fid(real, [r["fid"] for r in trained], cfg.inception_checkpoint)
        fid_untrained = pooled_fid(real, [r["fid"] for r in baseline], cfg.inception_checkpoint)
    matches = im.attribute_matches(images, held.captions, palette) if palette else None
    metrics: dict[str, Any] = {
        "attribute_accuracy": im.attribute_accuracy(matches) if matches else None,
        "fd_clip": im.pooled_fd([r["clip"] for r in trained], real_feats),
        "fd_clip_untrained": im.pooled_fd([r["clip"] for r in baseline], real_feats),
        "clip_score": float(im.clip_scores(gen_feats, gen_text).mean()),
        "clip_score_real": float(im.clip_scores(real_feats, real_text).mean()),
        "clip_score_formula": "mean of 100*max(cos(image, caption), 0)",
        "fid": fid,
        "fid_untrained": fid_untrained,
        "num_samples": len(images),
        "num_real": len(real),
        "image_size": size,
        "num_workers": len(chunks),
        "data_version": version,
        "holdout_fraction": cfg.holdout_fraction,
        "prior_run": prior_fit.run_name,
        "decoder_run": decoder_fit.run_name,
        "sample_steps": settings["sample_steps"],
        "guidance_scale": settings["guidance_scale"],
        "settings": settings,
    }
    if matches is not None:
        metrics["attribute_accuracy_untrained"] = im.attribute_accuracy(
            im.attribute_matches(
                np.concatenate([r["images"] for r in baseline]), held.captions, palette
            )
        )
    metrics["goals"] = goals(metrics)
    samples = {
        "images": images,
        "captions": held.captions,
        "matches": matches,
        "untrained": np.concatenate([r["images"] for r in baseline]),
        "real": real,
        "real_captions": held.real_captions,
    }
    write_report(
        report,
        f"unclip evaluation: {decoder_fit.run_name}",
        metrics,
        samples,
        prior_metrics,
        loss_curves or {},
        extra_images or {},
    )
    write_json(path, metrics)
    return metrics


def goals(m: dict[str, Any]) -> dict[str, Any]:
    """The quality goals, each as ``{value, target, met}`` (met is None when not measurable)."""
    fd_ratio = m["fd_clip"] / m["fd_clip_untrained"] if m["fd_clip_untrained"] else None
    clip_ratio = m["clip_score"] / m["clip_score_real"] if m["clip_score_real"] else None
    acc = m["attribute_accuracy"]
    return {
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
