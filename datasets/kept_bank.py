"""The kept members of a semantic-dedup version: the rows every later partition is compared with.

Per partition, beside its removal list, under ``curation/{clip}/semdedup/{version}/kept/{source}/``:

- ``{shard}.npy``: the kept rows' unit image embeddings as float16 [n, D] (rounded as the
  embedding files store them; widened to float32 they are exactly what the comparison used);
- ``{shard}.parquet``: their ``key`` and ``cluster``, row for row with the ``.npy``, sorted by
  cluster (stable, so rows of one cluster keep their batch order).

An incremental run reads every done partition's ``key`` and ``cluster`` columns, then only the
vectors of the clusters its new rows fall in: on a local disk through a memory map, so only the
pages of those clusters are read (a cluster's rows are contiguous), on object storage the file's
bytes. Raw vectors instead of Parquet lists make that read a copy, not a decode of the store.

A kept Parquet written before the ``.npy`` existed holds the vectors itself (an
``image_embedding`` column); the first run that needs it writes the ``.npy`` from it (atomically)
and reads on, with the same results.
"""

from __future__ import annotations

import bisect
import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from .embedding_file import vectors_to_numpy
from .storage import StorageLayout, atomic_write, exists, read_parquet

LEGACY_VECTORS = "image_embedding"  # the kept Parquet's vector column before the .npy


def kept_vectors_path(
    layout: StorageLayout, clip_id: str, version: str, source: str, shard: int
) -> str:
    """The ``.npy`` of one partition's kept vectors, beside its kept Parquet."""
    return layout.semdedup_kept(clip_id, version, source, shard).removesuffix(".parquet") + ".npy"


def write_kept(
    layout: StorageLayout,
    clip_id: str,
    version: str,
    part: tuple[str, int],
    keys: list[str],
    clusters: np.ndarray,
    x: np.ndarray,
) -> None:
    """One partition's kept rows: vectors (``.npy``) and keys with clusters (Parquet), atomically."""
    order = np.argsort(clusters, kind="stable")
    _write_npy(kept_vectors_path(layout, clip_id, version, *part), x[order].astype(np.float16))
    table = pa.table(
        {
            "key": pa.array([keys[i] for i in order], pa.string()),
            "cluster": pa.array(clusters[order], pa.int32()),
        }
    )
    with atomic_write(layout.semdedup_kept(clip_id, version, *part)) as f:
        pq.write_table(table, f)


def _write_npy(path: str, array: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.save(f, array, allow_pickle=False)


def _open_vectors(path: str) -> np.ndarray:
    """The ``.npy`` at ``path``: memory-mapped on a local disk, read whole elsewhere."""
    fs, p = url_to_fs(path)
    if isinstance(fs, LocalFileSystem):
        return np.load(p, mmap_mode="r")
    with fs.open(p, "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def _vectors_of(kept_path: str, vectors_path: str, rows: int) -> np.ndarray:
    """A partition's kept vectors, written from a kept Parquet of the older layout if need be."""
    if not exists(vectors_path):
        table = read_parquet(kept_path)
        if LEGACY_VECTORS not in table.column_names:
            raise FileNotFoundError(
                f"semantic dedup: {vectors_path} is missing and {kept_path} holds no vectors; "
                "run `unclip curate --recluster` to rebuild the version"
            )
        _write_npy(vectors_path, vectors_to_numpy(table.column(LEGACY_VECTORS)).astype(np.float16))
    vectors = _open_vectors(vectors_path)
    if vectors.ndim != 2 or len(vectors) != rows:
        raise ValueError(
            f"semantic dedup: {vectors_path} holds {vectors.shape[0] if vectors.ndim else 0} "
            f"vectors but {kept_path} lists {rows} kept rows"
        )
    return vectors


@dataclass
class _Selection:
    """The rows of one done partition that fall in the wanted clusters."""

    source: str
    kept_path: str
    vectors_path: str
    file_rows: int
    rows: np.ndarray  # indices into the partition's kept files
    keys: pa.Array
    clusters: np.ndarray


@dataclass
class KeptBank:
    """Kept members of some clusters over the done partitions, in partition then row order."""

    vectors: np.ndarray  # float16 [M, D]
    clusters: np.ndarray  # int32 [M]
    parts: list[_Selection]
    starts: list[int]  # first bank row of each selected partition

    def name(self, row: int) -> str:
        """The global key (``source/key``) of bank row ``row``."""
        p = bisect.bisect_right(self.starts, row) - 1
        part = self.parts[p]
        return f"{part.source}/{part.keys[row - self.starts[p]].as_py()}"


def _select(
    layout: StorageLayout, clip_id: str, version: str, name: str, wanted: np.ndarray
) -> _Selection | None:
    source, shard = name.rsplit("/", 1)
    kept_path = layout.semdedup_kept(clip_id, version, source, int(shard))
    table = read_parquet(kept_path, ["key", "cluster"])
    clusters = table.column("cluster").to_numpy()
    rows = np.flatnonzero(np.isin(clusters, wanted))
    if not len(rows):
        return None
    return _Selection(
        source,
        kept_path,
        kept_vectors_path(layout, clip_id, version, source, int(shard)),
        table.num_rows,
        rows,
        table.column("key").combine_chunks().take(pa.array(rows)),
        clusters[rows].astype(np.int32),
    )


def read_bank(
    layout: StorageLayout, clip_id: str, version: str, done: list[str], clusters: np.ndarray
) -> KeptBank | None:
    """The kept members of ``clusters`` over the ``done`` partitions (``source/shard``), or None."""
    wanted = np.asarray(clusters, np.int32)
    parts = [s for name in done if (s := _select(layout, clip_id, version, name, wanted))]
    if not parts:
        return None
    starts = np.cumsum([0] + [len(s.rows) for s in parts])
    out: np.ndarray | None = None
    for part, lo, hi in zip(parts, starts[:-1], starts[1:], strict=True):
        vectors = _vectors_of(part.kept_path, part.vectors_path, part.file_rows)
        if out is None:  # one array filled in place: no second, concatenated copy
            out = np.empty((starts[-1], vectors.shape[1]), np.float16)
        out[lo:hi] = vectors[part.rows]
        del vectors  # unmaps the file
    bank_clusters = np.concatenate([s.clusters for s in parts])
    return KeptBank(out, bank_clusters, parts, starts[:-1].tolist())
