"""Image filters inside a shard task, as hooks around img2dataset's ``Resizer`` and sample writer.

:class:`GuardedResizer` reads an image's header (PIL, no pixel decode) before img2dataset's
resizer decodes it, so a decompression bomb (a small file claiming 20000×20000 pixels) is
refused without allocating its pixels. Only formats in :data:`DECODABLE` whose header PIL can
read reach a decoder: anything else (HTML, a Radiance HDR or OpenEXR header OpenCV would
happily decode at any size) is refused unread. It also refuses truncated JPEGs (OpenCV may
decode them with a grey tail). Images with alpha or 16-bit samples are decoded here once, brought
to 8-bit BGR on white in uint8 row blocks (img2dataset composites in float64, ~76 bytes per pixel)
and handed to the resizer as an uncompressed BMP: about 10 bytes per pixel at the peak, so
``filters.max_image_area`` bounds a try's decode memory (docs/troubleshooting.md).

:func:`filtering_writer` wraps the sample writer: rows that img2dataset failed for a filter's
reason (image too small, aspect ratio, area, X-Robots-Tag opt-out) and images whose sha256
repeats one already written in the shard become ``status="filtered"`` rows with the filter's
name, and are counted in a :class:`FilterTally` that :func:`adjust_stats` folds into the shard's
stats, so a filtered row is neither a success nor a failure.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from .config import FilterConfig
from .perceptual_hash import PHASH_COLUMN, NearDuplicateIndex, phash_hex

FILTERED = "filtered"
# img2dataset's messages for what is a filter here, not a failure -> filter name.
RESIZE_FILTERS = {
    "image too small": "min_image_size",
    "image area too large": "max_image_area",
    "aspect ratio too large": "max_aspect_ratio",
}
DOWNLOAD_FILTERS = {"Use of image disallowed by X-Robots-Tag directive": "x_robots_tag"}
TRUNCATED_JPEG = "truncated image (JPEG without end-of-image marker)"
UNREADABLE = "image format not recognised from its header (refused before decoding)"
# PIL format names whose pixels OpenCV decodes the way PIL reads their header.
DECODABLE = {"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SCHEMA_ARG = 4  # img2dataset passes (shard_id, output_folder, save_caption, oom, schema, fmt)
_BLOCK_BYTES = 16 << 20  # uint16 temporaries per block of rows while compositing


@dataclass(frozen=True)
class Header:
    """What an image's header says, read without decoding pixels."""

    format: str
    width: int
    height: int
    mode: str
    bits: int  # bits per sample (16 for 16-bit PNG / TIFF)
    alpha: bool


def read_header(data: bytes) -> Header | str:
    """The header of ``data``, or the reason it is refused unread."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt, (w, h), mode = im.format or "", im.size, im.mode
                alpha = mode in _ALPHA_MODES or "transparency" in im.info
    except Image.DecompressionBombError:
        return "image area too large"
    except Exception:
        return UNREADABLE
    if fmt not in DECODABLE:
        return f"image format {fmt} not accepted (refused before decoding)"
    if w <= 0 or h <= 0:
        return UNREADABLE
    bits = 16 if mode.startswith("I;16") or mode in ("I", "RGBA;16", "RGB;16") else 8
    if fmt == "PNG" and len(data) > 24 and data[24] == 16:
        bits = 16
    return Header(fmt, w, h, mode, bits, alpha)


def header_check(data: bytes, cfg: FilterConfig) -> str | None:
    """img2dataset's message for a filter the header already fails (or why it is unreadable)."""
    head = read_header(data)
    if isinstance(head, str):
        return head
    w, h = head.width, head.height
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


def composite_on_white(bgra: np.ndarray) -> np.ndarray:
    """BGRA (uint8) → BGR on white, in uint8 blocks of rows: out = (c·a + 255·(255−a)) / 255."""
    h, w = bgra.shape[:2]
    out = np.empty((h, w, 3), np.uint8)
    step = max(1, _BLOCK_BYTES // max(w * 4 * 2, 1))
    for y in range(0, h, step):
        block = bgra[y : y + step]
        a = block[..., 3:4].astype(np.uint16)
        c = block[..., :3].astype(np.uint16)
        c *= a
        c += 255 * (255 - a)
        c += 127  # round to nearest
        c //= 255
        out[y : y + step] = c
    return out


def _flatten(data: bytes) -> bytes | None:
    """8-bit BGR BMP bytes of an image with alpha or 16-bit samples; None if undecodable."""
    import cv2

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        return None
    if img.dtype == np.uint16:
        img >>= 8
        img = img.astype(np.uint8)
    elif img.dtype != np.uint8:
        return None
    if img.ndim == 3 and img.shape[2] == 4:
        img = composite_on_white(img)
    ok, enc = cv2.imencode(".bmp", img)
    return enc.tobytes() if ok else None


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
        head = read_header(data)
        if isinstance(head, Header) and (head.alpha or head.bits > 8):
            flat = _flatten(data)
            if flat is None:
                return None, None, None, None, None, "Image decoding error"
            img_stream = io.BytesIO(flat)
        img_stream.seek(0)
        return self.resizer(img_stream, blurring_bbox_list)


@dataclass
class FilterTally:
    """What the filtering writer changed: removals per filter and the counts to take back."""

    filtered: Counter[str] = field(default_factory=Counter)
    relabeled: Counter[str] = field(default_factory=Counter)  # img2dataset message -> rows
    relabeled_download: int = 0
    relabeled_resize: int = 0
    dropped_successes: int = 0


def _with_phash(schema: pa.Schema) -> pa.Schema:
    if PHASH_COLUMN in schema.names:
        return schema
    return schema.append(pa.field(PHASH_COLUMN, pa.string()))


def filtering_writer(
    base: type,
    tally: FilterTally,
    dedup_sha256: bool,
    near_duplicates: NearDuplicateIndex | None = None,
) -> type:
    """A subclass of img2dataset's sample writer ``base`` that applies the in-shard filters.

    Every written image gets its pHash in the ``phash`` column; with ``near_duplicates`` (the
    source's earlier shards) an image within its distance of one of them, or of an image kept
    earlier in this shard, is filtered as ``dedup_image_phash``.
    """

    class FilteringWriter(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            args = list(args)
            if len(args) > _SCHEMA_ARG:  # the Parquet gets a phash column
                args[_SCHEMA_ARG] = _with_phash(args[_SCHEMA_ARG])
            elif "schema" in kwargs:
                kwargs["schema"] = _with_phash(kwargs["schema"])
            super().__init__(*args, **kwargs)
            self._seen: dict[str, str] = {}

        def write(self, img_str: Any, key: str, caption: Any, meta: dict[str, Any]) -> None:
            status, err = meta.get("status"), meta.get("error_message")
            name = None
            meta[PHASH_COLUMN] = phash_hex(img_str) if status == "success" and img_str else None
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
            if name is None and status == "success" and near_duplicates and meta[PHASH_COLUMN]:
                h = int(meta[PHASH_COLUMN], 16)
                found = near_duplicates.find(h)
                if found is None:
                    near_duplicates.add(h, key)
                else:
                    name, err = (
                        "dedup_image_phash",
                        f"near-duplicate of {found[0]} ({found[1]} bits)",
                    )
            if name is not None and status == "success":
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


def adjust_stats(stats: dict[str, Any], tally: FilterTally) -> dict[str, Any]:
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
