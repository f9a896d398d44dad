"""What ``unclip sample`` was asked for, checked, and the images it makes from the latest runs.

One of four modes: captions (CLIP text → prior → decoder → upsampler), variations of an image,
an interpolation between two captions, or the decoding of saved image embeddings. Bad input is a
``SampleUsageError`` (the CLI's exit code 2); a model never trained is a ``FileNotFoundError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from unclip.datasets.storage import StorageLayout
from unclip.pipelines.config import PipelineConfig
from unclip.training.engine.latest_runs import latest_export


class SampleUsageError(ValueError):
    """The request cannot be sampled as given: the message says why."""


@dataclass(frozen=True)
class SampleRequest:
    """The options of one ``unclip sample`` call."""

    captions: list[str]
    variation: Path | None = None
    interpolate: tuple[str, str] | None = None
    embedding: Path | None = None
    n: int = 4
    frames: int = 5
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    upsampler: Path | None = None
    no_upsampler: bool = False
    upsampler_steps: int | None = None

    def check(self) -> None:
        """Exactly one mode, no empty caption, a positive guidance, input files that exist."""
        modes = [
            m
            for m, on in (
                ("captions", self.captions),
                ("--variation", self.variation),
                ("--interpolate", self.interpolate),
                ("--embedding", self.embedding),
            )
            if on
        ]
        if len(modes) != 1:
            what = " and ".join(modes) if modes else "nothing"
            raise SampleUsageError(
                f"give captions, --variation, --interpolate or --embedding (got {what})"
            )
        for c in [*self.captions, *(self.interpolate or ())]:
            if not c.strip():
                raise SampleUsageError("empty caption")
        if self.guidance is not None and not self.guidance > 0:
            raise SampleUsageError(f"guidance scale must be > 0, got {self.guidance}")
        for name, path in (("--variation", self.variation), ("--embedding", self.embedding)):
            if path is not None and not path.is_file():
                raise SampleUsageError(f"{name} {path}: no such file")


@dataclass(frozen=True)
class Exports:
    """The exports a request samples from (an empty prior when it needs none)."""

    clip: str | None
    prior: str
    decoder: str
    upsamplers: list[str]


def exports_for(cfg: PipelineConfig, req: SampleRequest) -> Exports:
    """The latest trained exports the request needs; FileNotFoundError names a missing one."""
    layout = StorageLayout(cfg.storage)
    needs_prior = bool(req.captions or req.interpolate)
    needs_clip = needs_prior or req.variation is not None
    bootstrap = needs_clip and cfg.uses_bootstrap_clip
    if req.no_upsampler:
        ups: list[str] = []
    elif req.upsampler is not None:
        ups = [str(req.upsampler)]
    else:
        ups = [latest_export(layout, "upsampler")] if cfg.upsampler is not None else []
    return Exports(
        clip=latest_export(layout, "clip") if bootstrap else None,
        prior=latest_export(layout, "prior") if needs_prior else "",
        decoder=latest_export(layout, "decoder"),
        upsamplers=ups,
    )


def sample_images(cfg: PipelineConfig, req: SampleRequest) -> list[tuple[str, Image.Image]]:
    """(file stem, image) pairs for the request, from the latest trained runs."""
    req.check()
    ex = exports_for(cfg, req)
    from unclip.training import sampling

    common: dict[str, Any] = {
        "steps": req.steps or cfg.decoder.sample_steps,
        "guidance": req.guidance if req.guidance is not None else cfg.decoder.guidance_scale,
        "seed": req.seed,
        "upsampler_exports": ex.upsamplers,
        "upsampler_steps": req.upsampler_steps
        or (cfg.upsampler.sample_steps if cfg.upsampler is not None else None),
    }
    try:
        if req.captions:
            images = sampling.generate(
                req.captions, cfg.clip, ex.clip, ex.prior, ex.decoder, n_per_caption=req.n, **common
            )
            n = req.n
            return [(f"{slug(req.captions[i // n])}-{i % n}", im) for i, im in enumerate(images)]
        if req.interpolate:
            a, b = req.interpolate
            images = sampling.interpolate(
                a, b, req.frames, cfg.clip, ex.clip, ex.prior, ex.decoder, **common
            )
            return [(f"{slug(a)}-to-{slug(b)}-{i:02d}", im) for i, im in enumerate(images)]
        if req.variation is not None:
            images = sampling.variations(
                [_read_image(req.variation)],
                cfg.clip,
                ex.clip,
                ex.decoder,
                n_per_image=req.n,
                **common,
            )
            stem = slug(req.variation.stem)
            return [(f"variation-{stem}-{i}", im) for i, im in enumerate(images)]
        assert req.embedding is not None  # check() admits exactly one mode
        images = sampling.decode_embeddings(_read_embeddings(req.embedding), ex.decoder, **common)
        return [(f"embedding-{i}", im) for i, im in enumerate(images)]
    except ValueError as e:
        raise SampleUsageError(str(e)) from e


def _read_image(path: Path) -> Image.Image:
    from PIL import UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise SampleUsageError(f"--variation {path}: not an image ({e})") from e


def _read_embeddings(path: Path) -> Any:
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise SampleUsageError(f"--embedding {path}: not a .npy array ({e})") from e


def slug(text: str) -> str:
    """A file-name-safe stem of a caption."""
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")[:60] or "sample"
