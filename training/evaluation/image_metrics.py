"""Image metrics as pure functions: Fréchet distance, KID, CLIP score, the shapes' attribute check.

Nothing here loads a model or touches storage; ``cascade_eval.py`` feeds these the features
and images it pooled from its Ray workers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from unclip.datasets.synthetic import SHAPES

RGB = tuple[int, int, int]


# --- Fréchet distance -------------------------------------------------------------------------


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and (unbiased) covariance [D, D] of features [N, D], in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {list(x.shape)}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues → 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians N(mu1, s1) and N(mu2, s2) (Heusel et al. 2017).

    d² = ‖μ₁ − μ₂‖² + Tr(Σ₁) + Tr(Σ₂) − 2·Tr((Σ₁Σ₂)^½)

    Tr((Σ₁Σ₂)^½) is computed without a non-symmetric ``sqrtm``: Σ₁Σ₂ is similar to
    A = Σ₁^½ Σ₂ Σ₁^½ (symmetric PSD), so the trace is Σᵢ √λᵢ(A). This is stable where Σ₁ is
    singular (fewer samples than dimensions), where ``scipy.linalg.sqrtm`` returns complex noise.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(s1, np.float64), np.asarray(s2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"mismatched Gaussians: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}"
        )
    r1 = _sqrt_psd(s1)
    lam = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = float(np.sqrt(np.clip(lam, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fd_of_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between two feature sets [N, D] and [M, D]."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def pooled_fd(chunks: Sequence[np.ndarray], reference: np.ndarray) -> float:
    """FD of the workers' feature chunks pooled into one set, against ``reference``.

    Pooling is what makes the score a property of the whole sample: the mean of per-chunk FDs
    is biased upwards (each chunk's covariance is estimated from fewer samples) and depends on
    how the work was split.
    """
    chunks = [c for c in chunks if len(c)]
    if not chunks:
        raise ValueError("no generated features to pool")
    return fd_of_features(np.concatenate(chunks), reference)


# --- kernel distance (KID) --------------------------------------------------------------------


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (xᵀy / d + 1)³, the kernel of KID (Bińkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased estimate of MMD² between two feature sets [m, D], [n, D] (polynomial kernel).

    MMD²ᵤ = Σᵢ≠ⱼ k(xᵢ, xⱼ) / (m(m−1)) + Σᵢ≠ⱼ k(yᵢ, yⱼ) / (n(n−1)) − 2 Σᵢⱼ k(xᵢ, yⱼ) / (mn)

    Its expectation is 0 when both sets come from one distribution, whatever their size: that
    is why KID, unlike FID, may be read at a few hundred samples (it can be slightly negative).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2 or x.shape[1:] != y.shape[1:]:
        raise ValueError(
            f"need feature sets [>= 2, D] of one D, got {list(x.shape)}, {list(y.shape)}"
        )
    kxx, kyy, kxy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def kernel_distance(
    a: np.ndarray, b: np.ndarray, subset_size: int = 1000, num_subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """KID of two feature sets: mean and std of MMD²ᵤ over random subsets (clean-fid's protocol).

    Sets no larger than ``subset_size`` are compared whole (one estimate, std 0), so a small
    evaluation gives the exact unbiased statistic rather than a resampled one.
    """
    if len(a) <= subset_size and len(b) <= subset_size:
        return mmd2_unbiased(a, b), 0.0
    size = min(len(a), len(b), subset_size)
    rng = np.random.default_rng(seed)
    values = [
        mmd2_unbiased(
            a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)]
        )
        for _ in range(num_subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


# --- CLIP score -------------------------------------------------------------------------------


def clip_scores(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Per-pair CLIP score 100·max(cos(image, text), 0).

    Hessel et al. 2021's CLIPScore is w·max(cos, 0) with w = 2.5; w = 100 is torchmetrics'
    ``CLIPScore`` scaling, the one text-to-image papers report. Only ratios are compared here.
    """
    a = np.asarray(image_emb, np.float64)
    b = np.asarray(text_emb, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"image and text embeddings differ in shape: {a.shape} vs {b.shape}")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return 100.0 * np.clip((a * b).sum(axis=1), 0, None)


# --- attribute check for the synthetic shapes -------------------------------------------------


def parse_caption(caption: str, colors: Sequence[str]) -> tuple[str, str] | None:
    """``(colour, shape)`` of a single-object caption such as "a red circle"; None otherwise."""
    words = re.findall(r"[a-z]+", caption.lower())
    found_colors = [w for w in words if w in colors]
    found_shapes = [w for w in words if w in SHAPES]
    if len(found_colors) != 1 or len(found_shapes) != 1:
        return None
    return found_colors[0], found_shapes[0]


@dataclass(frozen=True)
class DetectedObject:
    """One object the pixel oracle found: colour, shape, centre (x right, y down) and area, in pixels."""

    color: str
    shape: str
    cx: float
    cy: float
    area: int


def soft_template(
    shape: str, size: tuple[int, int], cx: float, cy: float, area: float
) -> np.ndarray:
    """Pixel coverage [H, W] in [0, 1] of ``shape`` of the given area, centroid at (cx, cy),
    drawn as the synthetic generator draws it (4× supersampled, then box-averaged)."""
    w, h = size
    k = 4
    im = Image.new("L", (w * k, h * k), 0)
    draw = ImageDraw.Draw(im)
    if shape == "circle":
        r = np.sqrt(area / np.pi)
        draw.ellipse([k * v for v in (cx - r, cy - r, cx + r, cy + r)], fill=255)
    elif shape == "square":
        half = np.sqrt(area) / 2
        draw.rectangle([k * v for v in (cx - half, cy - half, cx + half, cy + half)], fill=255)
    else:  # upright triangle, base = height = s; its centroid lies s/3 above the base
        side = np.sqrt(2 * area)
        apex, base = cy - 2 * side / 3, cy + side / 3
        corners = [(cx, apex), (cx + side / 2, base), (cx - side / 2, base)]
        draw.polygon([(k * x, k * y) for x, y in corners], fill=255)
    fine = np.asarray(im, dtype=np.float32) / 255.0
    return fine.reshape(h, k, w, k).mean(axis=(1, 3))


def detect_objects(
    image: np.ndarray,
    palette: Mapping[str, RGB],
    min_area: float = 0.01,
    threshold: float = 60.0,
) -> list[DetectedObject]:
    """Exact pixel rules: every coloured shape of a synthetic-style image, largest first.

    1. The background colour is the median of the border pixels (the generator keeps every
       shape off the border); object pixels differ from it by more than ``threshold`` (RGB
       distance). A tinted or noisy background is thus still background.
    2. Each 4-connected group of object pixels covering at least ``min_area`` of the image is
       an object (smaller groups are strays); its colour is the palette colour nearest to its
       median RGB.
    3. Each pixel in and around the group is covered by the object by the fraction c of the
       way from the background to that colour; the object's area is Σc and its centre the
       c-weighted centroid, exact to a fraction of a pixel even where edges are blended.
    4. Its shape is the one (circle, square, upright triangle, drawn as the generator draws
       them with that area and centroid) whose coverage differs least from c (L1).
    """
    x = np.asarray(image, dtype=np.float32)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got {list(x.shape)}")
    h, w = x.shape[:2]
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    background = np.median(border, axis=0)
    labels, n = ndimage.label(np.linalg.norm(x - background, axis=-1) > threshold)
    sizes = np.bincount(labels.ravel())[1:]
    names = list(palette)
    refs = np.array([palette[c] for c in names], dtype=np.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres
    found = []
    for label in np.argsort(-sizes, kind="stable") + 1:
        if sizes[label - 1] < min_area * h * w:
            break
        blob = labels == label
        k = int(np.linalg.norm(refs - np.median(x[blob], axis=0), axis=1).argmin())
        region = ndimage.binary_dilation(blob, iterations=2) & ((labels == 0) | blob)
        d = refs[k] - background
        cover = np.clip((x - background) @ d / max(float(d @ d), 1e-6), 0.0, 1.0) * region
        area = float(cover.sum())
        cx, cy = float((cover * xs).sum() / area), float((cover * ys).sum() / area)

        def misfit(shape: str, cover: np.ndarray = cover, at: tuple = (cx, cy, area)) -> float:
            return float(np.abs(soft_template(shape, (w, h), *at) - cover).sum())

        found.append(DetectedObject(names[k], min(SHAPES, key=misfit), cx, cy, int(blob.sum())))
    return found


def classify_shape_image(
    image: np.ndarray,
    palette: Mapping[str, RGB],
    min_area: float = 0.02,
    threshold: float = 60.0,
) -> tuple[str | None, str | None]:
    """The colour and shape of the largest object (:func:`detect_objects`); ``(None, None)``
    when no object covers ``min_area`` of the pixels."""
    objects = detect_objects(image, palette, min_area, threshold)
    return (objects[0].color, objects[0].shape) if objects else (None, None)


def attribute_matches(
    images: Sequence[np.ndarray], captions: Sequence[str], palette: Mapping[str, RGB]
) -> list[bool | None]:
    """Per image: whether it shows its caption's colour and shape (None: caption not single-object)."""
    out: list[bool | None] = []
    for image, caption in zip(images, captions, strict=True):
        want = parse_caption(caption, list(palette))
        out.append(None if want is None else classify_shape_image(image, palette) == want)
    return out


def attribute_accuracy(matches: Sequence[bool | None]) -> float | None:
    """Fraction correct among the images an attribute check applies to (None if none)."""
    judged = [m for m in matches if m is not None]
    return sum(judged) / len(judged) if judged else None
