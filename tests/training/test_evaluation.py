"""Evaluation: the cosine suite's parts, and captions → CLIP → prior → decoder → PNG grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from training_helpers import TINY_CLIP, make_decoder_task, make_prior_task

from unclip.datasets.clip import build_bootstrap_clip, load_clip, save_clip
from unclip.training.config import EvaluateConfig
from unclip.training.evaluation import (
    caption_grid,
    prior_cosines,
    unrelated_index,
    write_sample_grid,
)
from unclip.training.sampling import generate


def test_unrelated_index_picks_another_caption():
    caps = ["a", "a", "b", "c", "c"]
    idx = unrelated_index(caps)
    assert all(caps[j] != caps[i] for i, j in enumerate(idx))
    assert list(unrelated_index(["x", "x"])) == [1, 0]


def test_prior_cosines_of_perfect_predictions():
    image = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    text = torch.nn.functional.normalize(image + 0.1 * torch.randn(6, 8), dim=-1)
    m = prior_cosines(image.clone(), image, text, np.roll(np.arange(6), 1))
    assert m["cos_pred_true"] == pytest.approx(1.0)
    assert m["cos_pred_text"] == pytest.approx(m["cos_text_baseline"])
    assert m["cos_pred_unrelated"] < 0.9


def test_caption_grid_has_a_row_per_caption():
    images = [Image.new("RGB", (16, 16), c) for c in ("red", "red", "blue", "blue")]
    grid = caption_grid(images, ["a red one", "a blue one"], per_caption=2, cell=32)
    assert grid.size[0] >= 2 * 32 and grid.size[1] >= 2 * 32


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """An untrained tiny CLIP, prior and decoder, exported as the training entry points do."""
    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    clip_dir = save_clip(build_bootstrap_clip(TINY_CLIP), TINY_CLIP, str(root / "clip"))
    bundle = load_clip(TINY_CLIP, clip_dir)
    prior = make_prior_task(dim=TINY_CLIP.embed_dim, clip_id=bundle.clip_id)
    prior.export(prior.build_model(), str(root / "prior"))
    decoder = make_decoder_task(dim=TINY_CLIP.embed_dim, clip_id=bundle.clip_id)
    decoder.export(decoder.build_model(), str(root / "decoder"))
    return clip_dir, str(root / "prior"), str(root / "decoder")


def test_generate_and_write_a_sample_grid(exports, embedded_store, tmp_path):
    clip_dir, prior_dir, decoder_dir = exports
    images = generate(
        ["a red circle", "a blue square"], TINY_CLIP, clip_dir, prior_dir, decoder_dir, 2, steps=2
    )
    assert len(images) == 4 and images[0].size == (16, 16)
    cfg = EvaluateConfig(captions=["a red circle", "a green triangle"], samples_per_caption=2)
    out = write_sample_grid(
        embedded_store.layout,
        TINY_CLIP,
        clip_dir,
        prior_dir,
        decoder_dir,
        cfg,
        str(tmp_path / "grid.png"),
    )
    with Image.open(out) as grid:
        assert grid.size[1] > 2 * 16


def test_bad_captions_are_clear_errors(exports):
    clip_dir, prior_dir, decoder_dir = exports
    with pytest.raises(ValueError, match="empty caption"):
        generate(["a red circle", "  "], TINY_CLIP, clip_dir, prior_dir, decoder_dir)
    with pytest.raises(ValueError, match="longer than the CLIP context"):
        generate(["a red circle " * 10], TINY_CLIP, clip_dir, prior_dir, decoder_dir)
    with pytest.raises(ValueError, match="guidance"):
        generate(["a red circle"], TINY_CLIP, clip_dir, prior_dir, decoder_dir, guidance=0.0)
