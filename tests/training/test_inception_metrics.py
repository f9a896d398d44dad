"""FID / KID: the FID Inception from a local weights file, clean-fid's resize, KID's unbiasedness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from training_helpers import write_random_fid_inception

from unclip.training.evaluation import image_metrics as im
from unclip.training.evaluation.inception_metrics import clean_resize, load_fid_inception


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory) -> tuple[str, str]:
    path = str(tmp_path_factory.mktemp("fid") / "weights-inception-2015-12-05.pt")
    return path, write_random_fid_inception(path)


def _image(seed: int, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_the_resize_is_clean_fids():
    make_resizer = pytest.importorskip("cleanfid.resize").make_resizer

    reference = make_resizer("PIL", False, "bicubic", (299, 299))
    for image in (_image(0), _image(1, size=401)):  # up and down
        ours = clean_resize(image)
        assert ours.dtype == np.float32 and ours.shape == (299, 299, 3)
        np.testing.assert_array_equal(ours, reference(image))


def test_weights_are_hashed_checked_and_their_features_are_the_networks(fid_weights, tmp_path):
    path, sha = fid_weights
    inception = load_fid_inception(path)
    assert inception.weights_sha256 == sha
    images = np.stack([_image(s, size=299) for s in range(2)])
    ours = inception.features(images)
    # At 299 px the resize is the identity: the layers we run are torch-fidelity's own forward.
    (reference,) = inception.net(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    np.testing.assert_allclose(ours, reference.double().numpy(), rtol=1e-4, atol=1e-5)
    assert ours.shape == (2, 2048) and ours.std() > 1e-3

    protocol = inception.protocol(num_generated=5, num_real=7)
    assert protocol["weights_sha256"] == sha and "clean-fid" in protocol["resize"]
    assert (protocol["num_generated"], protocol["num_real"]) == (5, 7)

    from torchvision.models import inception_v3

    torchvision_weights = str(tmp_path / "torchvision_inception.pt")
    torch.save(
        inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(),
        torchvision_weights,
    )
    with pytest.raises(ValueError, match="torchvision_inception.pt.*not the FID Inception"):
        load_fid_inception(torchvision_weights)
    with pytest.raises(FileNotFoundError, match="inception_checkpoint"):
        load_fid_inception(str(tmp_path / "missing.pt"))


def test_fid_of_a_set_with_itself_is_zero_and_a_shifted_set_scores_worse(fid_weights):
    inception = load_fid_inception(fid_weights[0])
    real = np.stack([_image(s) for s in range(4)])
    brighter = np.clip(real.astype(int) + 60, 0, 255).astype(np.uint8)
    other = np.stack([_image(s) for s in range(100, 104)])
    f_real, f_bright, f_other = (inception.features(x) for x in (real, brighter, other))
    same = im.fd_of_features(f_real, f_real)
    shifted = im.fd_of_features(f_bright, f_real)
    assert abs(same) < 1e-6 * shifted
    # a fresh sample of the same noise is nearer than the shifted images
    assert im.fd_of_features(f_other, f_real) < shifted


def test_kid_is_unbiased_on_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    draws = [
        im.mmd2_unbiased(rng.normal(size=(20, 32)), rng.normal(size=(20, 32))) for _ in range(200)
    ]
    spread = np.std(draws) / np.sqrt(len(draws))
    # unbiased: the mean over independent draws is 0 within its standard error (a biased
    # estimator, with the diagonal k(x, x) kept, sits far above 0 at 20 samples)
    assert abs(np.mean(draws)) < 3 * spread
    a, b = rng.normal(size=(20, 32)), rng.normal(size=(20, 32)) + 0.5
    assert im.mmd2_unbiased(a, b) > np.mean(draws) + 10 * np.std(draws)


def test_kid_compares_small_sets_whole_and_large_ones_by_subsets():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 8)), rng.normal(size=(40, 8)) + 0.3
    assert im.kernel_distance(a, b) == (im.mmd2_unbiased(a, b), 0.0)
    mean, std = im.kernel_distance(a, b, subset_size=10, num_subsets=50, seed=0)
    assert std > 0 and mean == pytest.approx(im.mmd2_unbiased(a, b), abs=4 * std)
    assert im.kernel_distance(a, b, subset_size=10, num_subsets=50, seed=0) == (mean, std)
    with pytest.raises(ValueError, match="feature sets"):
        im.mmd2_unbiased(a[:1], b)
