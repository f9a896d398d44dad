"""Dedup by a 128-bit hash of (url, caption), within a list and across every source ingested.

The index is one Parquet file per source under ``images/_dedup/url_caption/`` holding the hashes
of the rows that source kept. A new source is checked against the union of the others in the
driver, before it is split into shards, and its own file is then written atomically, so shard
tasks running in parallel never touch the index and a killed plan leaves it as it was. Two
sources planned at the same moment by two drivers do not see each other (both keep their rows).

Memory: the union is held as a sorted ``S16`` array, 16 bytes a hash (a billion rows: 16 GB);
beyond that the index should be partitioned by hash prefix.
"""

from __future__ import annotations

import hashlib
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from .storage import StorageLayout, atomic_write

HASH_DTYPE = "S16"
_SEP = b"\x1f"  # unit separator: cannot be confused with text in a URL or a caption


def url_caption_hashes(urls: list[str | None], captions: list[str | None]) -> np.ndarray:
    """blake2b-128 of ``url \\x1f caption`` per row, as an ``S16`` array."""
    digests = b"".join(
        hashlib.blake2b(
            (u or "").encode("utf-8", "surrogatepass")
            + _SEP
            + (c or "").encode("utf-8", "surrogatepass"),
            digest_size=16,
        ).digest()
        for u, c in zip(urls, captions, strict=True)
    )
    return np.frombuffer(digests, dtype=HASH_DTYPE)


def first_occurrence(hashes: np.ndarray) -> np.ndarray:
    """True where a hash occurs for the first time in ``hashes``."""
    _, first = np.unique(hashes, return_index=True)
    out = np.zeros(len(hashes), bool)
    out[first] = True
    return out


def load_index(layout: StorageLayout, exclude: str | None = None) -> np.ndarray:
    """Sorted union of the (url, caption) hashes of every indexed source except ``exclude``."""
    fs, d = url_to_fs(layout.dedup_index_dir())
    if not fs.exists(d):
        return np.empty(0, HASH_DTYPE)
    parts = []
    for p in sorted(fs.ls(d, detail=False)):
        name = posixpath.basename(p.rstrip("/"))
        if not name.endswith(".parquet") or name == f"{exclude}.parquet":
            continue  # temporaries of a killed writer, and the source being planned
        with fs.open(p, "rb") as f:
            parts.append(hashes_of(pq.read_table(f, columns=["hash"]).column("hash")))
    if not parts:
        return np.empty(0, HASH_DTYPE)
    return np.unique(np.concatenate(parts))


def hashes_of(column: pa.FixedSizeBinaryArray | pa.ChunkedArray) -> np.ndarray:
    """A ``binary(16)`` column's values as an ``S16`` array, read from its buffer at its offset."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not len(col):
        return np.empty(0, HASH_DTYPE)
    return np.frombuffer(col.buffers()[1], HASH_DTYPE, count=len(col), offset=col.offset * 16)


def duplicates(hashes: np.ndarray, index: np.ndarray) -> np.ndarray:
    """True where a row repeats an earlier row of the list or a hash of ``index``."""
    dup = ~first_occurrence(hashes)
    if len(index):
        dup |= np.isin(hashes, index, assume_unique=False)
    return dup


def record_source(layout: StorageLayout, source: str, hashes: np.ndarray) -> None:
    """Add ``source``'s kept hashes to the index (one file, written atomically)."""
    arr = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(16), len(hashes), [None, pa.py_buffer(np.ascontiguousarray(hashes).tobytes())]
    )
    with atomic_write(layout.dedup_index(source)) as f:
        pq.write_table(pa.table({"hash": arr}), f)


def is_recorded(layout: StorageLayout, source: str) -> bool:
    fs, p = url_to_fs(layout.dedup_index(source))
    return fs.exists(p)
