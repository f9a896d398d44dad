"""What ``unclip sample`` was asked for, checked, and the images it makes from the trained runs.

One of four modes: captions (CLIP text → prior → decoder → upsampler), variations of an image,
an interpolation between two captions, or the decoding of saved image embeddings. Bad input is a
``SampleUsageError`` (the CLI's exit code 2); a model never trained (or never promoted, when the
promoted runs are asked for) is a ``FileNotFoundError``. The runs load as one ``UnclipPipeline``
on the device asked for (``auto``: CUDA when there is a GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from unclip.pipelines.config import PipelineConfig
from unclip.pipelines.model_bundle import ChosenRun, Which, choose_cascade, load_cascade
from unclip.training.inference.call_options import DecodeOptions
from unclip.training.inference.device import resolve_device


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
    which: Which = "promoted"
    device: str = "auto"

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


def find_config(given: Path | None) -> Path:
    """The config given, else ``$UNCLIP_CONFIG``, else ./configs/demo.yaml; an error naming each tried."""
    if given is not None:
        tried = [given]
    else:
        env = os.environ.get("UNCLIP_CONFIG")
        tried = ([Path(env)] if env else []) + [Path("configs/demo.yaml")]
    for path in tried:
        if path.is_file():
            return path
    raise SampleUsageError(
        f"no pipeline config found (tried {', '.join(map(str, tried))}): pass -c CONFIG "
        "or set UNCLIP_CONFIG"
    )


def cascade_for(cfg: PipelineConfig, req: SampleRequest) -> list[ChosenRun]:
    """The runs the request samples from; FileNotFoundError names a missing one."""
    if req.upsampler is not None and req.no_upsampler:
        raise SampleUsageError("give --upsampler or --no-upsampler, not both")
    chosen = choose_cascade(cfg, req.which)
    if req.no_upsampler:
        return [c for c in chosen if c.model != "upsampler"]
    if req.upsampler is not None:
        given = ChosenRun("upsampler", str(req.upsampler), str(req.upsampler), "named")
        return [c for c in chosen if c.model != "upsampler"] + [given]
    return chosen


def sample_images(cfg: PipelineConfig, req: SampleRequest) -> list[tuple[str, Image.Image]]:
    """(file stem, image) pairs for the request, from the promoted (or latest) runs."""
    req.check()
    try:
        device = resolve_device(req.device)
        pipe = load_cascade(cfg, cascade_for(cfg, req), device)
    except ValueError as e:
        raise SampleUsageError(str(e)) from e
    common: DecodeOptions = {
        "decoder_num_inference_steps": req.steps or cfg.decoder.sample_steps,
        "decoder_guidance_scale": req.guidance
        if req.guidance is not None
        else cfg.decoder.guidance_scale,
        "seed": req.seed,
        "super_res_num_inference_steps": req.upsampler_steps
        or (cfg.upsampler.sample_steps if cfg.upsampler is not None else None),
    }
    try:
        if req.captions:
            images = pipe(req.captions, num_images_per_prompt=req.n, **common).images
            n = req.n
            return [(f"{slug(req.captions[i // n])}-{i % n}", im) for i, im in enumerate(images)]
        if req.interpolate:
            a, b = req.interpolate
            images = pipe.interpolate(a, b, req.frames, **common).images
            return [(f"{slug(a)}-to-{slug(b)}-{i:02d}", im) for i, im in enumerate(images)]
        if req.variation is not None:
            source = _read_image(req.variation)
            images = pipe.image_variations(source, num_images_per_image=req.n, **common).images
            stem = slug(req.variation.stem)
            return [(f"variation-{stem}-{i}", im) for i, im in enumerate(images)]
        assert req.embedding is not None  # check() admits exactly one mode
        emb = _read_embeddings(req.embedding)
        images = pipe.decode_image_embeddings(emb, **common).images
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
