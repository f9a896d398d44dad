"""Image filters inside a shard task, as hooks around img2dataset's ``Resizer`` and sample writer.

:class:`GuardedResizer` reads an image's header (PIL, no pixel decode) before img2dataset's
resizer decodes it, so a decompression bomb (a small file claiming 20000×20000 pixels) is
refused without allocating its pixels; it also refuses truncated JPEGs (OpenCV may decode them
with a grey tail) and brings 16-bit PNGs to 8 bits (img2dataset's alpha compositing assumes
8). Palette and grey-alpha PNGs decode to BGRA in OpenCV and are composited on white by
img2dataset.

:func:`filtering_writer` wraps the sample writer: rows that img2dataset failed for a filter's
reason (image too small, aspect ratio, area, X-Robots-Tag opt-out) and images whose sha256
repeats one already written in the shard become ``status="filtered"`` rows with the filter's
name, and are counted in a :class:`ShardTally` that :func:`adjust_stats` folds into the shard's
stats, so a filtered row is neither a success nor a failure.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .config import FilterConfig

FILTERED = "filtered"
# img2dataset's messages for what is a filter here, not a failure -> filter name.
RESIZE_FILTERS = {
    "image too small": "min_image_size",
    "image area too large": "max_image_area",
    "aspect ratio too large": "max_aspect_ratio",
}
DOWNLOAD_FILTERS = {"Use of image disallowed by X-Robots-Tag directive": "x_robots_tag"}
TRUNCATED_JPEG = "truncated image (JPEG without end-of-image marker)"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"


def header_check(data: bytes, cfg: FilterConfig) -> str | None:
    """img2dataset's message for a size filter the header already fails, else None (no decode)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.DecompressionBombError:
        return "image area too large"
    except Exception:  # not an image PIL knows: the resizer reports its own decoding error
        return None
    if w <= 0 or h <= 0:
        return None
    if min(w, h) < cfg.min_image_size:
        return "image too small"
    if w * h > cfg.max_image_area:
        return "image area too large"
    if cfg.max_aspect_ratio is not None and max(w, h) / min(w, h) > cfg.max_aspect_ratio:
        return "aspect ratio too large"
    return None


def truncated_jpeg(data: bytes) -> bool:
    """A JPEG whose last scan (after the last SOS marker) has no EOI marker: the body was cut.

    Entropy-coded data cannot contain ``FF D9`` (0xFF is stuffed), so a complete file has EOI
    after its last SOS; without any SOS the data is corrupt, and the decoder says so itself.
    """
    if not data.startswith(b"\xff\xd8"):
        return False
    sos = data.rfind(b"\xff\xda")
    return sos >= 0 and data.find(b"\xff\xd9", sos) < 0


def _png_8bit(data: bytes) -> bytes:
    """A 16-bit PNG as an 8-bit PNG (channels and alpha kept); other data unchanged."""
    if not (data.startswith(_PNG_SIG) and len(data) > 24 and data[24] == 16):
        return data
    import cv2

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.dtype != np.uint16:
        return data
    ok, enc = cv2.imencode(".png", (img >> 8).astype(np.uint8))
    return enc.tobytes() if ok else data


class GuardedResizer:
    """img2dataset's resizer behind the header checks above (same call and return shape)."""

    def __init__(self, resizer: Any, cfg: FilterConfig) -> None:
        self.resizer = resizer
        self.cfg = cfg

    def __call__(self, img_stream: io.BytesIO, blurring_bbox_list: Any = None) -> tuple:
        img_stream.seek(0)
        data = img_stream.read()
        reason = header_check(data, self.cfg)
        if reason is None and truncated_jpeg(data):
            reason = TRUNCATED_JPEG
        if reason is not None:
            return None, None, None, None, None, reason
        fixed = _png_8bit(data)
        if fixed is not data:
            img_stream = io.BytesIO(fixed)
        img_stream.seek(0)
        return self.resizer(img_stream, blurring_bbox_list)


@dataclass
class ShardTally:
    """What the filtering writer changed: removals per filter and the counts to take back."""

    filtered: Counter[str] = field(default_factory=Counter)
    relabeled: Counter[str] = field(default_factory=Counter)  # img2dataset message -> rows
    relabeled_download: int = 0
    relabeled_resize: int = 0
    dropped_successes: int = 0


def filtering_writer(base: type, tally: ShardTally, dedup_sha256: bool) -> type:
    """A subclass of img2dataset's sample writer ``base`` that applies the in-shard filters."""

    class FilteringWriter(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._seen: dict[str, str] = {}

        def write(self, img_str: Any, key: str, caption: Any, meta: dict[str, Any]) -> None:
            status, err = meta.get("status"), meta.get("error_message")
            name = None
            if status == "failed_to_resize" and err in RESIZE_FILTERS:
                name = RESIZE_FILTERS[err]
                tally.relabeled_resize += 1
            elif status == "failed_to_download" and err in DOWNLOAD_FILTERS:
                name = DOWNLOAD_FILTERS[err]
                tally.relabeled_download += 1
            elif status == "success" and dedup_sha256 and meta.get("sha256"):
                first = self._seen.setdefault(meta["sha256"], key)
                if first != key:
                    name, err = "dedup_image_sha256", f"same image as {first}"
                    tally.dropped_successes += 1
                    img_str = None
                    for k in ("width", "height", "original_width", "original_height"):
                        meta[k] = None
            if name is not None:
                if status != "success":
                    tally.relabeled[err] += 1
                tally.filtered[name] += 1
                meta["status"] = FILTERED
                meta["error_message"] = f"filter {name}: {err}"
            super().write(img_str, key, caption, meta)

    return FilteringWriter


def adjust_stats(stats: dict[str, Any], tally: ShardTally) -> dict[str, Any]:
    """img2dataset's shard stats with filtered rows moved out of successes and failures."""
    out = dict(stats)
    out["successes"] = stats["successes"] - tally.dropped_successes
    out["failed_to_download"] = stats["failed_to_download"] - tally.relabeled_download
    out["failed_to_resize"] = stats["failed_to_resize"] - tally.relabeled_resize
    status = Counter(stats.get("status_dict", {}))
    status["success"] -= tally.dropped_successes
    status.subtract(tally.relabeled)
    out["status_dict"] = {k: v for k, v in status.items() if v > 0}
    out["filtered"] = dict(tally.filtered)
    out["filtered_total"] = sum(tally.filtered.values())
    return out
