"""Photo-like synthetic images and edited copies of them, for near-duplicate tests and benchmarks.

The demo's captioned shapes are flat drawings: two different ones share a perceptual hash as
often as not. These images are smooth random fields (a colour gradient under soft blobs of
random colour, size and place, hard-edged ellipses and boxes over them, a little grain), so distinct seeds look distinct to pHash
the way distinct photos do, and :func:`edited_copy` makes the copies web data is full of: the
same image re-encoded at another JPEG quality, resized, cropped by a few pixels, or with its
colours shifted. Deterministic: the same seed gives the same pixels.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

EDITS = ("reencode", "resize", "crop", "color_jitter")
_WORDS = ("a photo of", "an image showing", "picture:", "a shot of")
_THINGS = ("a hillside", "a market", "a harbour", "a field", "a street", "a garden", "a room")


def photo(seed: int, size: int = 96) -> Image.Image:
    """A deterministic photo-like RGB image of side ``size``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = top * (1 - y[..., None]) + bottom * y[..., None]
    for _ in range(int(rng.integers(4, 9))):
        cy, cx = rng.uniform(0, 1, 2)
        r = rng.uniform(0.08, 0.35)
        w = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - w) + rng.uniform(0, 255, 3) * w
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    for _ in range(int(rng.integers(5, 10))):  # hard edges, as objects in a photo have
        x0, y0 = rng.uniform(-0.2, 0.9, 2) * size
        x1, y1 = x0 + rng.uniform(0.15, 0.6) * size, y0 + rng.uniform(0.15, 0.6) * size
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=fill)
    grain = rng.normal(0, 4, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(out) + grain, 0, 255).astype(np.uint8), "RGB")


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """``image`` encoded as JPEG."""
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def edited_copy(image: Image.Image, edit: str, seed: int) -> Image.Image:
    """``image`` after one of :data:`EDITS` (random strength from ``seed``)."""
    rng = np.random.default_rng(seed)
    w, h = image.size
    if edit == "reencode":
        return Image.open(io.BytesIO(jpeg(image, int(rng.integers(35, 70))))).convert("RGB")
    if edit == "resize":
        scale = rng.uniform(0.6, 0.85)
        return image.resize((int(w * scale), int(h * scale)), Image.Resampling.BICUBIC)
    if edit == "crop":
        left, top, right, bottom = rng.integers(1, 5, 4)
        return image.crop((left, top, w - right, h - bottom))
    if edit == "color_jitter":
        out = ImageEnhance.Brightness(image).enhance(rng.uniform(0.85, 1.15))
        out = ImageEnhance.Color(out).enhance(rng.uniform(0.8, 1.2))
        return ImageEnhance.Contrast(out).enhance(rng.uniform(0.9, 1.1))
    raise ValueError(f"unknown edit {edit!r}; expected one of {EDITS}")


def caption(seed: int, variant: int = 0) -> str:
    """A caption for image ``seed``; other ``variant`` values word it differently."""
    rng = np.random.default_rng(seed)
    thing = _THINGS[int(rng.integers(len(_THINGS)))]
    return f"{_WORDS[variant % len(_WORDS)]} {thing} number {seed}"
