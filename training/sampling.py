"""Images from exported checkpoints: captions → CLIP text embedding → prior → decoder → upsamplers.

The checks and stage helpers every sampler shares, :func:`load_pipeline` (exports by path →
:class:`unclip.training.inference.UnclipPipeline`, which holds the sampling itself and unCLIP's
other uses of the image embedding: variations and interpolation) and :func:`generate`, one call
from paths to images. :func:`slerp` is the interpolation's path between two embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from unclip.datasets.clip import ClipBundle, load_clip
from unclip.datasets.config import ClipConfig

from .models.decoder_sampler import DecoderSampler
from .models.upsampler import UpsamplerSampler

if TYPE_CHECKING:
    from .inference import UnclipPipeline


def check_captions(captions: Sequence[str], bundle: ClipBundle) -> None:
    """Refuse empty captions and captions the tokenizer would cut off."""
    if isinstance(captions, str):
        raise TypeError("captions must be a list of strings, not one string")
    if not captions:
        raise ValueError("no captions given")
    tok = bundle.tokenizer
    context = getattr(tok, "context_length", None)
    for c in captions:
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"empty caption: {c!r}")
        if context is not None and hasattr(tok, "encode"):
            n = len(tok.encode(c)) + 2  # start and end tokens
            if n > context:
                raise ValueError(
                    f"caption {c!r} is {n} tokens, longer than the CLIP context of {context}"
                )


def check_guidance(**scales: float | None) -> None:
    """Refuse a guidance scale of 0 or less before any model runs."""
    for name, value in scales.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} guidance scale must be > 0, got {value}")


def check_clip(bundle: ClipBundle, **infos: dict) -> None:
    """Refuse models trained on another CLIP's embeddings than the one loaded."""
    for name, info in infos.items():
        trained_on = info.get("clip_id")
        if trained_on and trained_on != bundle.clip_id:
            raise ValueError(
                f"the {name} was trained on embeddings of CLIP {trained_on}, "
                f"but the CLIP loaded here is {bundle.clip_id}"
            )


def check_cascade(decoder: DecoderSampler, upsamplers: Sequence[UpsamplerSampler]) -> None:
    """Each stage must take the size of image that the stage before it makes."""
    size, made_by = decoder.image_size, "the decoder"
    for i, up in enumerate(upsamplers):
        if up.input_size != size:
            raise ValueError(
                f"upsampler {i + 1} takes {up.input_size} px images but {made_by} makes "
                f"{size} px images (upsampler input size {up.input_size} != {size})"
            )
        size, made_by = up.output_size, f"upsampler {i + 1}"


def load_pipeline(
    decoder_export: str,
    clip_cfg: ClipConfig | None = None,
    clip_checkpoint: str | None = None,
    prior_export: str | None = None,
    upsampler_exports: Sequence[str] = (),
    device: str = "cpu",
) -> UnclipPipeline:
    """The exports as one pipeline on ``device``, loaded once (the CLIP when a config is given)."""
    from .inference import UnclipPipeline

    clip = load_clip(clip_cfg, clip_checkpoint) if clip_cfg is not None else None
    pipe = UnclipPipeline.from_exports(decoder_export, clip, prior_export, upsampler_exports)
    return pipe.to(device)


def generate(
    captions: Sequence[str],
    clip_cfg: ClipConfig,
    clip_checkpoint: str | None,
    prior_export: str | None,
    decoder_export: str,
    n_per_caption: int = 1,
    *,
    upsampler_exports: Sequence[str] = (),
    **options: Any,
) -> list[Image.Image]:
    """``n_per_caption`` images per caption, caption-major, through :class:`UnclipPipeline`.

    ``options`` are the pipeline call's keywords (``decoder_num_inference_steps``, ``seed``,
    ``prior_guidance_scale``, …). Loads the exports for this one call; to sample repeatedly,
    build the pipeline once (``UnclipPipeline.from_exports``) and call it. A decoder conditioned
    on the caption (``decoder.condition: text_tokens`` or ``caption_transformer``) reads the
    captions itself: it needs no prior (``prior_export`` None), and any prior given is unused.
    """
    if isinstance(captions, str):
        raise TypeError("captions must be a list of strings, not one string")
    if n_per_caption < 1:
        raise ValueError(f"n_per_caption must be >= 1, got {n_per_caption}")
    check_guidance(
        decoder=options.get("decoder_guidance_scale"), prior=options.get("prior_guidance_scale")
    )
    pipe = load_pipeline(decoder_export, clip_cfg, clip_checkpoint, prior_export, upsampler_exports)
    return pipe(list(captions), num_images_per_prompt=n_per_caption, **options).images


def sample_stages(
    pipe: UnclipPipeline,
    captions: Sequence[str],
    seed: int,
    upsampler_steps: int | None = None,
    **options: Any,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(the cascade's uint8 images, the decoder's images the upsampler started from, or None
    without an upsampler), drawn as one ``pipe(captions, seed=seed, **options)`` call draws them:
    one batch, every stage's noise from ``seed``."""
    if "batch_size" in options:
        raise ValueError("sample_stages draws one batch: pass no batch_size")
    base = pipe(list(captions), seed=seed, upsample=False, output_type="np", **options).images
    upsampler = pipe.upsampler_sampler()
    if upsampler is None:
        return base, None
    return upsampler.sample(base, steps=upsampler_steps, seed=seed), base


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of directions, linear of norms (unCLIP sec. 3.2).

    1. â = a/‖a‖, b̂ = b/‖b‖, θ = arccos(â·b̂)
    2. v = sin((1−t)θ)/sin θ · â + sin(tθ)/sin θ · b̂   (Shoemake 1985); v = â + t(b̂ − â) as θ → 0
    3. out = ((1−t)‖a‖ + t‖b‖) · v
    """
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na.clamp_min(1e-12), b / nb.clamp_min(1e-12)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    small = sin.abs() < 1e-6
    wa = torch.where(small, torch.full_like(sin, 1.0 - t), torch.sin((1 - t) * theta) / sin)
    wb = torch.where(small, torch.full_like(sin, t), torch.sin(t * theta) / sin)
    return ((1 - t) * na + t * nb) * (wa * ua + wb * ub)
