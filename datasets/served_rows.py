"""Which rows of a dataset version's embedding files the version serves.

A manifest entry keeps the rows that pass its CLIP-score filter and are not in its removal file
(curation); the kept count must equal the entry's ``count``. Imported sources have embeddings
only, and the image models refuse them.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from .storage import StorageLayout


@functools.lru_cache(maxsize=64)
def removal_file_keys(path: str) -> pa.Array:
    """The keys of a manifest's removal file (content-addressed, so safe to cache)."""
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"{path}: a removal file the manifest lists is missing")
    with fs.open(p, "rb") as f:
        return pq.read_table(f, columns=["key"]).column("key").combine_chunks()


def require_images(manifest: dict[str, Any]) -> None:
    """Raise unless every shard of the manifest has images (imported sources have none)."""
    no_images = sorted({e["source"] for e in manifest["shards"] if not e.get("images")})
    if no_images:
        raise ValueError(
            f"dataset version {manifest['version']}: sources {no_images} have embeddings only "
            "(imported, no image shards); the decoder and upsampler train on images: assemble "
            "a manifest without them"
        )


def kept_mask(
    layout: StorageLayout, table: pa.Table, manifest: dict[str, Any], entry: dict[str, Any]
) -> np.ndarray:
    """Rows of an entry's table the manifest serves: those passing its CLIP-score filter and
    not in its removal file (curation); all rows of an uncurated, unfiltered manifest.

    The kept count must equal the manifest's ``count``: anything else means the file is not
    the one the manifest was assembled from.
    """
    path = layout.join(entry["embeddings"])
    threshold = manifest.get("clip_score_min")
    if threshold is None:
        keep = np.ones(table.num_rows, dtype=bool)
    else:
        keep = table.column("clip_score").to_numpy().astype(np.float64) >= float(threshold)
    if entry.get("removed"):
        gone = pc.is_in(
            table.column("key"), value_set=removal_file_keys(layout.join(entry["removed"]))
        )
        keep &= ~np.asarray(gone.to_numpy(zero_copy_only=False), dtype=bool)
    if "count" in entry and int(keep.sum()) != int(entry["count"]):
        raise ValueError(
            f"{path}: {int(keep.sum())} samples pass the manifest's filter, the manifest lists "
            f"{entry['count']}"
        )
    return keep
