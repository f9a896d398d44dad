"""Perceptual near-duplicates at ingest: a 64-bit pHash per image and a Hamming-distance index.

The hash is imagehash's DCT pHash of the *resized* image ingest writes, so every sample of every
shard is hashed from the same pipeline's output. It is stored as 16 hex digits in the shard's
Parquet (column ``phash``), which is also the index of a source's earlier shards: a shard task
reads that one column of the committed shards numbered below it (never an image) and drops a
new image within ``filters.phash_max_distance`` bits of one of them, or of one written earlier
in the same shard.

Lookup is multi-index hashing: the 64 bits are cut into ``distance + 1`` bands, and two hashes
within ``distance`` bits agree exactly on at least one band (pigeonhole), so only the hashes
sharing a band value are compared. Each band is a sorted array searched with ``searchsorted``.
"""

from __future__ import annotations

import io

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from PIL import Image

from .shards import completed_shards
from .storage import StorageLayout

PHASH_COLUMN = "phash"
PHASH_BITS = 64


def phash_hex(image_bytes: bytes) -> str:
    """The 64-bit pHash of an encoded image, as 16 hex digits."""
    with Image.open(io.BytesIO(image_bytes)) as im:
        return str(imagehash.phash(im.convert("RGB"), hash_size=8))


def hex_to_uint64(values: list[str | None]) -> np.ndarray:
    """Hex pHashes as uint64 (a missing hash is an error: filter them out first)."""
    return np.array([int(v, 16) for v in values], dtype=np.uint64)


def hamming(a: np.ndarray | int, b: np.ndarray) -> np.ndarray:
    """Bits that differ between ``a`` and each of ``b`` (uint64)."""
    return np.bitwise_count(np.bitwise_xor(np.uint64(a), b)).astype(np.int64)


def _bands(distance: int) -> list[tuple[int, int]]:
    """(shift, width) of ``distance + 1`` bands covering the 64 bits."""
    n = distance + 1
    edges = [round(i * PHASH_BITS / n) for i in range(n + 1)]
    return [(lo, hi - lo) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


class NearDuplicateIndex:
    """Hashes with names; :meth:`find` returns a stored name within ``distance`` bits, or None."""

    def __init__(self, distance: int, hashes: np.ndarray, names: list[str]) -> None:
        if not 0 <= distance < PHASH_BITS // 2:
            raise ValueError(f"phash distance {distance}: expected 0..{PHASH_BITS // 2 - 1}")
        self.distance = distance
        self.hashes = np.asarray(hashes, dtype=np.uint64)
        self.names = list(names)
        self._bands = []
        for shift, width in _bands(distance):
            values = (self.hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            order = np.argsort(values, kind="stable")
            self._bands.append((shift, width, values[order], order))
        self._added: list[int] = []  # hashes added one by one (a shard's own), compared directly
        self._added_names: list[str] = []

    def find(self, h: int) -> tuple[str, int] | None:
        """(name, distance) of the first stored hash within the distance of ``h``, or None."""
        h64 = np.uint64(h)
        candidates = []
        for shift, width, values, order in self._bands:
            v = (h64 >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            lo, hi = np.searchsorted(values, v, "left"), np.searchsorted(values, v, "right")
            if hi > lo:
                candidates.append(order[lo:hi])
        if candidates:
            idx = np.unique(np.concatenate(candidates))
            d = hamming(h64, self.hashes[idx])
            close = np.flatnonzero(d <= self.distance)
            if len(close):
                i = close[np.argmin(d[close])]
                return self.names[idx[i]], int(d[i])
        if self._added:
            d = hamming(h64, np.array(self._added, dtype=np.uint64))
            i = int(np.argmin(d))
            if d[i] <= self.distance:
                return self._added_names[i], int(d[i])
        return None

    def add(self, h: int, name: str) -> None:
        """Remember ``h`` (a hash kept in the shard being written)."""
        self._added.append(h)
        self._added_names.append(name)


def earlier_shard_hashes(layout: StorageLayout, source: str, shard: int) -> pa.Table:
    """``key`` and ``phash`` of the kept images of ``source``'s committed shards below ``shard``.

    Reads the ``phash`` column of each shard's Parquet (no image); shards ingested before the
    column existed contribute nothing.
    """
    tables = []
    for earlier in completed_shards(layout, source):
        if earlier >= shard:
            continue
        path = layout.image_shard_parquet(source, earlier)
        fs, p = url_to_fs(path)
        with fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            if PHASH_COLUMN not in pf.schema_arrow.names:
                continue
            t = pf.read(columns=["key", "status", PHASH_COLUMN])
        t = t.filter(pc.and_(pc.equal(t["status"], "success"), pc.is_valid(t[PHASH_COLUMN])))
        tables.append(t.select(["key", PHASH_COLUMN]))
    if not tables:
        return pa.table({"key": pa.array([], pa.string()), PHASH_COLUMN: pa.array([], pa.string())})
    return pa.concat_tables(tables)


def index_from_table(distance: int, table: pa.Table) -> NearDuplicateIndex:
    """A :class:`NearDuplicateIndex` over a ``key`` / ``phash`` table."""
    return NearDuplicateIndex(
        distance,
        hex_to_uint64(table.column(PHASH_COLUMN).to_pylist()),
        table.column("key").to_pylist(),
    )
