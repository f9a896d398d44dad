"""The importer's vector pass: unit float16 rows kept as they are, others normalised, and the
CLIP score of the normalised rows, over more rows than one block."""

from __future__ import annotations

import numpy as np

from unclip.datasets.embedding_import import _BLOCK_ROWS, unit_pairs

ROWS = 2 * _BLOCK_ROWS + 37  # two whole blocks and a partial one


def _unit16(rng: np.random.Generator, n: int = ROWS, d: int = 24) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _normalised(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def test_unit_float16_rows_are_stored_as_they_are_with_their_score():
    rng = np.random.default_rng(0)
    image, text = _unit16(rng), _unit16(rng)
    got_image, got_text, score = unit_pairs(image, text)
    assert got_image is image and got_text is text  # not rounded a second time
    want = (_normalised(image) * _normalised(text)).sum(1)
    np.testing.assert_allclose(score, want, rtol=0, atol=2e-6)
    assert score.dtype == np.float32 and score.shape == (ROWS,)


def test_one_row_off_unit_length_normalises_that_whole_side_only():
    rng = np.random.default_rng(1)
    image, text = _unit16(rng), _unit16(rng)
    text[ROWS - 3] *= np.float16(4)  # in the last, partial block
    got_image, got_text, score = unit_pairs(image, text)
    assert got_image is image
    np.testing.assert_array_equal(got_text, _normalised(text).astype(np.float16))
    assert abs(np.linalg.norm(got_text[ROWS - 3].astype(np.float32)) - 1) < 2e-3
    np.testing.assert_allclose(
        score, (_normalised(image) * _normalised(text)).sum(1), rtol=0, atol=2e-6
    )


def test_float32_input_is_stored_normalised_float16_and_a_zero_row_stays_zero():
    rng = np.random.default_rng(2)
    image = rng.standard_normal((ROWS, 8)).astype(np.float32) * 3
    text = _normalised(rng.standard_normal((ROWS, 8)))  # unit already, but not float16
    image[_BLOCK_ROWS] = 0
    got_image, got_text, score = unit_pairs(image, text)
    assert got_image.dtype == got_text.dtype == np.float16
    np.testing.assert_array_equal(got_image, _normalised(image).astype(np.float16))
    np.testing.assert_array_equal(got_text, _normalised(text).astype(np.float16))
    assert not got_image[_BLOCK_ROWS].any() and score[_BLOCK_ROWS] == 0
    np.testing.assert_allclose(
        score, (_normalised(image) * _normalised(text)).sum(1), rtol=0, atol=2e-6
    )
