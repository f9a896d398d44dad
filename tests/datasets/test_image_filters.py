"""Image filters in the shard task: header checks before decode, truncation, 16-bit PNGs, tallies."""

from __future__ import annotations

import io
import os
import tracemalloc

import cv2
import numpy as np
import pytest
from PIL import Image

from unclip.datasets.config import FilterConfig
from unclip.datasets.image_filters import (
    UNREADABLE,
    FilterTally,
    GuardedResizer,
    adjust_stats,
    composite_on_white,
    filtering_writer,
    header_check,
    truncated_jpeg,
)

from .conftest import bomb_png, jpeg_bytes, ok_image, png_bytes

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


# A 309-byte Radiance HDR whose header claims 20000 x 20000 float pixels.
HDR_BOMB = (b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 20000 +X 20000\n" + b"\x02\x02" * 128)[:309]


@pytest.mark.parametrize(
    ("data", "cfg", "reason"),
    [
        (bomb_png(20000), FilterConfig(), "image area too large"),
        (bomb_png(100000), FilterConfig(), "image area too large"),  # past PIL's own limit
        (bomb_png(100), FilterConfig(max_image_area=5000), "image area too large"),
        (png_bytes(ok_image(1, 8)), FilterConfig(min_image_size=16), "image too small"),
        (
            png_bytes(ok_image(1).resize((300, 30))),
            FilterConfig(max_aspect_ratio=5),
            "aspect ratio too large",
        ),
        (png_bytes(ok_image(1)), FilterConfig(min_image_size=48, max_aspect_ratio=1), None),
        (b"<html></html>", FilterConfig(), UNREADABLE),  # not an image: never decoded
        (HDR_BOMB, FilterConfig(), UNREADABLE),  # OpenCV would allocate 4.8 GB for it
    ],
)
def test_header_check(data, cfg, reason):
    """Size filters from the header; formats the header check cannot read are refused."""
    assert header_check(data, cfg) == reason


def test_truncated_jpeg():
    jpg = jpeg_bytes(ok_image(3, 256))
    assert not truncated_jpeg(jpg)
    assert not truncated_jpeg(jpg + b"trailing junk")
    assert truncated_jpeg(jpg[:-2]) and truncated_jpeg(jpg[: len(jpg) // 2])
    assert not truncated_jpeg(png_bytes(ok_image(3)))


def _resizer():
    from img2dataset.resizer import Resizer

    return Resizer(
        image_size=16,
        resize_mode="no",
        resize_only_if_bigger=False,
        encode_format="png",
        encode_quality=1,
    )


def test_guarded_resizer_refuses_bombs_before_decoding_and_fixes_16_bit_pngs():
    r = GuardedResizer(_resizer(), FilterConfig())
    out = r(io.BytesIO(bomb_png()))
    assert out == (None, None, None, None, None, "image area too large")
    rgba16 = np.zeros((8, 8, 4), np.uint16)
    rgba16[:, :4] = (0, 0, 65535, 65535)  # BGRA: opaque red on the left
    rgba16[:, 4:] = (65535, 0, 0, 0)  # transparent blue on the right
    img, w, h, *_, err = r(io.BytesIO(cv2.imencode(".png", rgba16)[1].tobytes()))
    assert err is None and (w, h) == (8, 8)
    px = np.asarray(Image.open(io.BytesIO(img)).convert("RGB"), np.int32)
    assert (px[:, :4] == [255, 0, 0]).all() and (px[:, 4:] == [255, 255, 255]).all()


class _Recorder:
    def __init__(self, *args):
        self.rows = []

    def write(self, img_str, key, caption, meta):
        self.rows.append((img_str, key, dict(meta)))


def test_filtering_writer_relabels_and_adjust_stats_moves_counts():
    tally = FilterTally()
    w = filtering_writer(_Recorder, tally, dedup_sha256=True)()
    ok = {"status": "success", "error_message": None, "sha256": "s1", "width": 8}
    img = jpeg_bytes(ok_image(1))
    w.write(img, "k0", "c", dict(ok))
    w.write(img, "k1", "c", dict(ok))
    w.write(None, "k2", "c", {"status": "failed_to_resize", "error_message": "image too small"})
    w.write(
        None,
        "k3",
        "c",
        {
            "status": "failed_to_download",
            "error_message": "Use of image disallowed by X-Robots-Tag directive",
        },
    )
    w.write(None, "k4", "c", {"status": "failed_to_download", "error_message": "HTTP Error 404"})
    statuses = [(k, m["status"], m["error_message"], data is not None) for data, k, m in w.rows]
    assert len(w.rows[0][2]["phash"]) == 16 and w.rows[4][2]["phash"] is None
    assert statuses == [
        ("k0", "success", None, True),
        ("k1", "filtered", "filter dedup_image_sha256: same image as k0", False),
        ("k2", "filtered", "filter min_image_size: image too small", False),
        (
            "k3",
            "filtered",
            "filter x_robots_tag: Use of image disallowed by X-Robots-Tag directive",
            False,
        ),
        ("k4", "failed_to_download", "HTTP Error 404", False),
    ]
    stats = {
        "count": 5,
        "successes": 2,
        "failed_to_download": 2,
        "failed_to_resize": 1,
        "status_dict": {
            "success": 2,
            "image too small": 1,
            "Use of image disallowed by X-Robots-Tag directive": 1,
            "HTTP Error 404": 1,
        },
    }
    out = adjust_stats(stats, tally)
    assert (out["successes"], out["failed_to_download"], out["failed_to_resize"]) == (1, 1, 0)
    assert out["status_dict"] == {"success": 1, "HTTP Error 404": 1}
    assert out["filtered"] == {"dedup_image_sha256": 1, "min_image_size": 1, "x_robots_tag": 1}
    assert out["filtered_total"] == 3


def test_png_quality_is_a_compression_level():
    from pydantic import ValidationError

    from unclip.datasets.config import IngestConfig

    with pytest.raises(ValidationError, match="ingest.encode_quality=95: for encode_format 'png'"):
        IngestConfig(encode_format="png")
    assert IngestConfig(encode_format="png", encode_quality=3).encode_quality == 3


class _Decoder:
    """Stands in for img2dataset's resizer to record whether any bytes reached a decoder."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, img_stream, blurring_bbox_list=None):
        self.calls += 1
        return None, None, None, None, None, "decoded"


def test_formats_the_header_check_cannot_read_never_reach_a_decoder():
    decoder = _Decoder()
    r = GuardedResizer(decoder, FilterConfig())
    for data in (HDR_BOMB, b"<html>not an image</html>", b"\x76\x2f\x31\x01" + b"\0" * 300):
        assert r(io.BytesIO(data))[-1].startswith("image format")
    assert decoder.calls == 0


def test_alpha_compositing_stays_in_uint8_and_matches_img2datasets_formula():
    rng = np.random.default_rng(0)
    bgra = rng.integers(0, 256, (64, 80, 4), dtype=np.uint8)
    a = bgra[..., 3:4] / 255
    expected = np.rint((a * bgra[..., :3] + 255 - bgra[..., 3:4]).clip(0, 255))
    got = composite_on_white(bgra)
    assert got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_an_rgba_png_is_resized_with_bounded_memory():
    side = 3000  # 9 Mpx: img2dataset's float64 compositing peaks near 76 bytes per pixel
    bgra = np.zeros((side, side, 4), np.uint8)
    bgra[:, : side // 2] = (0, 0, 255, 255)  # opaque red left, transparent right
    data = cv2.imencode(".png", bgra)[1].tobytes()
    del bgra
    r = GuardedResizer(_resizer(), FilterConfig())
    tracemalloc.start()
    img, w, h, *_, err = r(io.BytesIO(data))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert err is None and (w, h) == (side, side)
    assert peak < 12 * side * side, f"{peak / side / side:.1f} bytes per pixel in numpy"
    px = np.asarray(Image.open(io.BytesIO(img)).convert("RGB"), np.int32)
    assert (px[:, 0] == [255, 0, 0]).all() and (px[:, -1] == [255, 255, 255]).all()
