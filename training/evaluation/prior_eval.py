"""Evaluation written under ``eval/{run}/``: the prior's cosine suite on held-out pairs, sample grids."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from unclip.datasets import readers
from unclip.datasets.config import ClipConfig
from unclip.datasets.storage import StorageLayout, atomic_write, write_json

from ..config import EvaluateConfig, PriorConfig
from ..engine.fit_result import FitResult
from ..models.prior_sampler import load_prior
from ..sampling import generate
from .metric_names import PRIOR_METRICS_FILE


def unrelated_index(captions: Sequence[str]) -> np.ndarray:
    """For each pair, the next pair (cyclically) with another caption; the next one if none has."""
    n = len(captions)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        out[i] = (i + 1) % n
        for k in range(1, n):
            j = (i + k) % n
            if captions[j] != captions[i]:
                out[i] = j
                break
    return out


def prior_cosines(
    pred: torch.Tensor, image: torch.Tensor, text: torch.Tensor, unrelated: np.ndarray
) -> dict[str, float]:
    """LAION's prior metrics: mean cosines of predictions to truth, text and an unrelated image."""
    pred, image, text = (F.normalize(x.float(), dim=-1) for x in (pred, image, text))

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a * b).sum(-1).mean())

    return {
        "cos_pred_true": cos(pred, image),
        "cos_pred_text": cos(pred, text),
        "cos_pred_unrelated": cos(pred, image[torch.from_numpy(unrelated)]),
        "cos_text_baseline": cos(text, image),
    }


def evaluate_prior(
    layout: StorageLayout,
    manifest_version: str,
    prior_fit: FitResult,
    cfg: EvaluateConfig,
    holdout_fraction: float,
    prior_cfg: PriorConfig | None = None,
    out_path: str | None = None,
) -> dict[str, Any]:
    """Cosine suite of the exported prior on held-out pairs → ``eval/{run}/prior_metrics.json``.

    Sampling (steps, guidance, k candidates) follows ``prior_cfg`` when given, else the export's
    info: those keys do not name the run, so the export may hold the values it was trained with.
    ``out_path`` writes the metrics elsewhere (a promoted prior judged on a newer data version).
    The metrics record what they depend on (data version, split, CLIP, protocol), so only
    evaluations in one context are compared.
    """
    manifest = readers.load_manifest(layout, manifest_version)
    held = readers.load_embeddings(layout, manifest, "holdout", holdout_fraction)
    n = min(len(held.keys), cfg.max_pairs)
    if n == 0:
        raise ValueError(
            f"dataset {manifest_version} has no held-out pairs at holdout_fraction={holdout_fraction}"
        )
    text = torch.from_numpy(held.text[:n])
    image = torch.from_numpy(held.image[:n])
    sampler = load_prior(prior_fit.export_dir)
    if sampler.text_tokens:  # token encodings of the held-out captions, with the data's CLIP
        from unclip.datasets.clip_records import load_clip_of

        sampler.use_clip(load_clip_of(layout, str(manifest["clip_id"])))
    captions = held.captions[:n]
    info = sampler.info
    steps = prior_cfg.sample_steps if prior_cfg else info.get("sample_steps", 50)
    scale = prior_cfg.guidance_scale if prior_cfg else info.get("guidance_scale", 1.0)
    k = prior_cfg.candidates if prior_cfg else info.get("candidates", 1)
    pred = torch.cat(
        [
            sampler.sample(
                text[i : i + 256],
                steps,
                scale,
                seed=i,
                candidates=k,
                captions=captions[i : i + 256],
            )
            for i in range(0, n, 256)
        ]
    )
    metrics: dict[str, Any] = {
        **prior_cosines(pred, image, text, unrelated_index(held.captions[:n])),
        "num_pairs": n,
        "run_name": prior_fit.run_name,
        "data_version": manifest_version,
        "split": "holdout",
        "holdout_fraction": holdout_fraction,
        "clip_id": str(manifest["clip_id"]),
        "sample_steps": steps,
        "guidance_scale": scale,
        "candidates": k,
    }
    write_json(out_path or f"{layout.eval_dir(prior_fit.run_name)}/{PRIOR_METRICS_FILE}", metrics)
    return metrics


def caption_grid(
    images: Sequence[Image.Image], captions: Sequence[str], per_caption: int, cell: int = 128
) -> Image.Image:
    """One row per caption: its ``per_caption`` images side by side, the caption under them."""
    font = ImageFont.load_default()
    text_h = 22
    pad = 4
    width = per_caption * (cell + pad) + pad
    row_h = cell + text_h + pad
    grid = Image.new("RGB", (width, len(captions) * row_h + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, caption in enumerate(captions):
        y = pad + r * row_h
        for k in range(per_caption):
            im = images[r * per_caption + k].resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(im, (pad + k * (cell + pad), y))
        draw.text((pad, y + cell + 4), caption, fill="black", font=font)
    return grid


def write_sample_grid(
    layout: StorageLayout,
    clip_cfg: ClipConfig,
    clip_checkpoint: str | None,
    prior_export: str,
    decoder_export: str,
    cfg: EvaluateConfig,
    out_path: str,
) -> str:
    """Sample ``cfg.captions`` through CLIP → prior → decoder and write a captioned PNG grid."""
    images = generate(
        cfg.captions,
        clip_cfg,
        clip_checkpoint,
        prior_export,
        decoder_export,
        n_per_caption=cfg.samples_per_caption,
    )
    grid = caption_grid(images, cfg.captions, cfg.samples_per_caption)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    with atomic_write(out_path, "wb") as f:
        f.write(buf.getvalue())
    return out_path
