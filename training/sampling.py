"""Captions to images from exported checkpoints: CLIP text embedding → prior → decoder."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from unclip.datasets.clip import ClipBundle, encode_texts, load_clip
from unclip.datasets.config import ClipConfig

from .decoder import load_decoder
from .prior import load_prior


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


def generate(
    captions: Sequence[str],
    clip_cfg: ClipConfig,
    clip_checkpoint: str | None,
    prior_export: str,
    decoder_export: str,
    n_per_caption: int = 1,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    prior_steps: int | None = None,
    prior_guidance: float | None = None,
) -> list[Image.Image]:
    """``n_per_caption`` images per caption, caption-major; decoder steps / guidance default to the export's."""
    if n_per_caption < 1:
        raise ValueError(f"n_per_caption must be >= 1, got {n_per_caption}")
    bundle = load_clip(clip_cfg, clip_checkpoint)
    check_captions(captions, bundle)
    prior = load_prior(prior_export)
    decoder = load_decoder(decoder_export)
    for name, info in (("prior", prior.info), ("decoder", decoder.info)):
        trained_on = info.get("clip_id")
        if trained_on and trained_on != bundle.clip_id:
            raise ValueError(
                f"the {name} was trained on embeddings of CLIP {trained_on}, "
                f"but the CLIP loaded here is {bundle.clip_id}"
            )
    text = torch.from_numpy(encode_texts(bundle, list(captions)))
    text = text.repeat_interleave(n_per_caption, dim=0)
    image_emb = prior.sample(text, steps=prior_steps, guidance_scale=prior_guidance, seed=seed)
    pixels = decoder.sample(image_emb, steps=steps, guidance_scale=guidance, seed=seed)
    return [Image.fromarray(np.asarray(p)) for p in pixels]
