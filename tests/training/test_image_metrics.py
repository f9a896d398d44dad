"""Image metrics: Fréchet distance (pooled vs per-chunk), CLIP score, the shapes' attribute check."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from unclip.datasets.config import SyntheticConfig
from unclip.datasets.synthetic import PALETTE, render_image, sample_spec, shape_caption
from unclip.training.evaluation import image_metrics as im

SYN = SyntheticConfig(num_pairs=300, image_size=96, seed=0)
PAL = {c: PALETTE[c] for c in SYN.colors}


def scipy_fd(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's sqrtm, as pytorch-fid computes it."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_the_sqrtm_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    assert im.fd_of_features(a, b) == pytest.approx(scipy_fd(a, b), rel=1e-6)
    assert im.fd_of_features(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_a_shift_is_its_squared_length():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, 5))
    shift = np.array([3.0, 0, -4.0, 0, 0])
    assert im.fd_of_features(a, a + shift) == pytest.approx(25.0, rel=1e-9)


def test_frechet_distance_is_finite_with_fewer_samples_than_dimensions():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(12, 32))
    d = im.fd_of_features(a, b)
    assert np.isfinite(d) and d > 0


def test_pooled_fd_is_the_fd_of_all_features_not_the_mean_of_chunks():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(300, 8))
    gen = rng.normal(size=(240, 8)) * 1.2 + 0.3
    chunks = np.array_split(gen, 4)  # what four workers would return
    pooled = im.pooled_fd(chunks, real)
    assert pooled == pytest.approx(im.fd_of_features(gen, real), rel=1e-12)
    mean_of_chunks = float(np.mean([im.fd_of_features(c, real) for c in chunks]))
    # Per-chunk covariances from 60 samples are noisier: their FDs are biased upwards.
    assert mean_of_chunks > pooled * 1.05
    with pytest.raises(ValueError, match="no generated features"):
        im.pooled_fd([gen[:0]], real)


def test_mismatched_gaussians_are_a_clear_error():
    with pytest.raises(ValueError, match="mismatched"):
        im.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="N >= 2"):
        im.feature_stats(np.zeros((1, 3)))


def test_clip_score_is_100_times_the_clipped_cosine():
    t = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    i = np.array([[2.0, 0.0], [0.0, -1.0], [1.0, 1.0]])
    assert im.clip_scores(i, t) == pytest.approx([100.0, 0.0, 100 / np.sqrt(2)])


def test_parse_caption():
    colors = list(PAL)
    assert im.parse_caption("a red circle", colors) == ("red", "circle")
    assert im.parse_caption("An Orange triangle.", colors) == ("orange", "triangle")
    assert im.parse_caption("a red circle above a blue square", colors) is None
    assert im.parse_caption("a photo of a dog", colors) is None


def real_shapes(size: int) -> tuple[list[np.ndarray], list[str]]:
    """The demo's real images: rendered at 96 px, ingested at 64, read at ``size``."""
    images, captions = [], []
    for i in range(SYN.num_pairs):
        x = render_image(SYN, i).resize((64, 64), Image.Resampling.BICUBIC)
        images.append(np.asarray(x.resize((size, size), Image.Resampling.BICUBIC)))
        captions.append(sample_spec(SYN, i)["caption"])
    return images, captions


@pytest.mark.parametrize("size", [32, 64])
def test_attribute_check_on_real_synthetic_images(size):
    images, captions = real_shapes(size)
    acc = im.attribute_accuracy(im.attribute_matches(images, captions, PAL))
    assert acc >= 0.99


def test_attribute_check_rejects_wrong_images():
    images, captions = real_shapes(32)
    n = 60
    # Another colour, same shape; another shape, same colour.
    wrong_color, wrong_shape = [], []
    for c in captions[:n]:
        color, shape = im.parse_caption(c, list(PAL))
        other_c = next(x for x in PAL if x != color)
        other_s = next(x for x in im.SHAPES if x != shape)
        wrong_color.append(shape_caption(other_c, shape))
        wrong_shape.append(shape_caption(color, other_s))
    assert im.attribute_accuracy(im.attribute_matches(images[:n], wrong_color, PAL)) == 0.0
    assert im.attribute_accuracy(im.attribute_matches(images[:n], wrong_shape, PAL)) <= 0.02
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
    assert im.attribute_accuracy(im.attribute_matches(noise, captions[:n], PAL)) <= 0.2
    blank = [np.full((32, 32, 3), 245, np.uint8)] * 3
    assert im.classify_shape_image(blank[0], PAL) == (None, None)
    assert im.attribute_matches(blank, captions[:3], PAL) == [False] * 3


def test_attribute_accuracy_is_none_where_no_check_applies():
    images, _ = real_shapes(32)
    matches = im.attribute_matches(
        images[:2], ["a photo of a dog", "two red squares and a blue one"], PAL
    )
    assert matches == [None, None]
    assert im.attribute_accuracy(matches) is None
