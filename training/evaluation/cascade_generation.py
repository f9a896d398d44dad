"""The cascade's images for an evaluation, drawn in Ray tasks, and the untrained decoder they are judged against."""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from unclip.datasets.clip import encode_images
from unclip.datasets.config import ClipConfig
from unclip.datasets.progress_records import progress_extra
from unclip.datasets.ray_runtime import ensure_started
from unclip.datasets.storage import StorageLayout, exists, read_json

from ..config import DecoderConfig
from ..engine.artifacts import publish_dir
from ..inference.device import resolve_device
from ..models.decoder import INFO_FILE, DecoderTask, to_uint8, to_unit_range
from ..models.upsampler import upsample
from ..sampling import load_pipeline, sample_stages
from .inception_metrics import load_fid_inception

log = logging.getLogger(__name__)

UNTRAINED_MARKER = "untrained.json"


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
    device: str = "cpu",
) -> dict[str, Any]:
    """One worker's share: images, their CLIP image features, their FID Inception features.

    With an upsampler, also the CLIP features of the decoder's own images upsampled bilinearly
    (``clip_bilinear``): the baseline the upsampler has to beat, on the same images it starts from.
    """
    pipe = load_pipeline(
        decoder_export,
        clip_cfg,
        clip_checkpoint,
        prior_export,
        cascade.get("upsampler_exports", ()),
        device=device,
    )
    arr, base = sample_stages(
        pipe,
        captions,
        seed,
        cascade.get("upsampler_steps"),
        decoder_num_inference_steps=steps,
        decoder_guidance_scale=guidance,
    )
    bilinear = None if base is None else to_uint8(upsample(to_unit_range(base), arr.shape[1]))
    out = {
        "images": arr,
        "clip": encode_images(pipe.clip_bundle(), [Image.fromarray(x) for x in arr]),
        "inception": (
            load_fid_inception(inception_checkpoint).features(arr) if inception_checkpoint else None
        ),
    }
    if bilinear is not None:
        out["clip_bilinear"] = encode_images(
            pipe.clip_bundle(), [Image.fromarray(x) for x in bilinear]
        )
    return out


def split(items: list[str], parts: int) -> list[tuple[int, list[str]]]:
    """``(offset, chunk)`` pairs of about equal size, in order."""
    bounds = np.linspace(0, len(items), min(parts, len(items)) + 1).round().astype(int)
    return [(int(a), items[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def run_chunks(jobs: list[dict[str, Any]], device: str = "auto") -> list[dict[str, Any]]:
    """Run ``generate_chunk(**job)`` for every job as Ray tasks, in order: one GPU each when
    ``device`` resolves to CUDA (``auto``: the cluster has GPUs), else one CPU each."""
    import ray

    ensure_started()
    on = resolve_device(device, int(ray.cluster_resources().get("GPU", 0)))
    gpus = 1 if on.startswith("cuda") else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=1)(generate_chunk)
    refs = [task.remote(**job, device="cuda" if gpus else "cpu") for job in jobs]
    images = {ref: len(job["captions"]) for ref, job in zip(refs, jobs, strict=True)}
    total, done, started, pending = sum(images.values()), 0, time.monotonic(), list(refs)
    while pending:  # a progress line as each task finishes; results are taken in job order
        finished, pending = ray.wait(pending, num_returns=1)
        done += images[finished[0]]
        rate = done / max(time.monotonic() - started, 1e-9)
        log.info(
            "evaluation: %d/%d images generated on %s (%d/%d tasks), %.1f images/s",
            done,
            total,
            on,
            len(refs) - len(pending),
            len(refs),
            rate,
            extra=progress_extra("evaluation", done, total),
        )
    return ray.get(refs)


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
    info = read_json(f"{trained_export.rstrip('/')}/{INFO_FILE}")
    task = DecoderTask.of_embeddings(layout, version, cfg, holdout_fraction, info)
    torch.manual_seed(seed)
    model = task.build_model()
    with tempfile.TemporaryDirectory(prefix="unclip-untrained-") as d:
        task.export(model, d)
        publish_dir(d, target, UNTRAINED_MARKER, {"seed": seed, "untrained": True})
    return target
