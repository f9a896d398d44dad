"""Batched open_clip preprocessing: bit-identical to the per-image transform, or not taken."""

from __future__ import annotations

import numpy as np

from unclip.datasets.clip import load_clip
from unclip.datasets.clip_preprocess import FastPreprocess, chunk_pixels


def test_fast_preprocess_is_bit_identical_to_open_clips_transform(shapes_store, tiny_clip_cfg):
    from PIL import Image
    from torchvision import transforms

    bundle = load_clip(tiny_clip_cfg, shapes_store.clip_checkpoint)
    fast = FastPreprocess.of(bundle.preprocess)
    assert fast is not None and fast.size == 32
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(5)]
    ref = np.stack([bundle.preprocess(im).numpy() for im in ims])
    got = fast(np.stack([np.asarray(im) for im in ims]))
    assert got.dtype == np.float32 and np.array_equal(got, ref)
    other = Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    assert fast.applies(ims[0]) and not fast.applies(other)
    assert not fast.applies(ims[0].convert("L"))
    # a chunk mixing both paths: each row as the per-image transform gives it
    mixed = chunk_pixels([np.asarray(ims[1]), bundle.preprocess(other).numpy()], fast)
    np.testing.assert_array_equal(mixed[0], ref[1])
    np.testing.assert_array_equal(mixed[1], bundle.preprocess(other).numpy())
    augmenting = transforms.Compose([transforms.RandomResizedCrop(32), transforms.ToTensor()])
    assert FastPreprocess.of(augmenting) is None


def test_fast_preprocess_is_bit_identical_on_every_value_of_every_channel(
    shapes_store, tiny_clip_cfg
):
    """The normalization is a function of (value, channel) alone: all 256 x 3 of them."""
    from PIL import Image

    bundle = load_clip(tiny_clip_cfg, shapes_store.clip_checkpoint)
    fast = FastPreprocess.of(bundle.preprocess)
    values = np.zeros((32, 32, 3), np.uint8)
    values.reshape(-1, 3)[:256] = np.arange(256, dtype=np.uint8)[:, None]
    values.reshape(-1, 3)[256:512] = np.arange(256, dtype=np.uint8)[::-1, None]
    ref = bundle.preprocess(Image.fromarray(values)).numpy()
    got = fast(values[None])[0]
    assert got.flags.c_contiguous and got.shape == (3, 32, 32)
    assert np.array_equal(got.view(np.int32), ref.view(np.int32))  # the same bits, not just close
