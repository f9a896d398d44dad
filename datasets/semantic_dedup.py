"""Semantic dedup as a stage: removal lists per partition, incremental against frozen centroids.

A *partition* is one embedded shard (``embeddings/{clip}/{source}/{shard}.parquet``). The first
run fits k-means centroids on every partition's image embeddings and freezes them as a version
(named by a hash of the centroids and the settings) under ``curation/{clip}/semdedup/{version}/``.
Each partition then gets, through a temporary name and a rename:

- ``removals/{source}/{shard}.parquet``: ``key``, ``duplicate_of`` (``source/key`` of the kept
  sample), ``similarity`` — the rows the manifest leaves out; shards are never rewritten;
- ``kept/{source}/{shard}.npy`` and ``.parquet``: its kept rows' vectors (float16) and their
  ``key`` and ``cluster``, which is all a later partition is compared with (``kept_bank``).

``state.json`` lists the partitions done (with their removal list's sha256) and is written after
their files: it is the commit. A later run assigns only the partitions missing from it to the
frozen centroids and compares them with the kept members of their clusters — read from the
``.npy`` files, memory-mapped on a local disk, only those clusters' rows — so its cost grows with
the new rows. ``current.json`` names the version in use; a re-cluster fits new centroids on
everything, writes a whole new version and switches ``current.json`` last, so a run killed at
any point leaves the version in use, and every manifest made from it, as they were.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from .curation_config import SemanticDedupConfig
from .duplicate_groups import assign, find_duplicates, fit_centroids
from .embedding_file import vector_dim, vectors_to_numpy
from .kept_bank import KeptBank, read_bank, write_kept
from .lease import Lease, LeaseHeld
from .shards import completed_shards
from .storage import StorageLayout, atomic_write, exists, read_json, read_parquet, write_json

log = logging.getLogger(__name__)

Partition = tuple[str, int]  # (source, shard)
_COLUMNS = ["key", "image_embedding", "clip_score"]
LEASE_WAIT_S = 600.0


@dataclass
class CurationResult:
    """What one run of the stage did."""

    version: str
    reclustered: bool
    partitions_total: int
    partitions_new: int
    rows_new: int = 0
    removed_new: int = 0
    seconds: float = 0.0
    removed_by_partition: dict[str, int] = field(default_factory=dict)


def partition_name(part: Partition) -> str:
    """``source/shard`` as the state and the manifest spell it."""
    return f"{part[0]}/{part[1]:05d}"


def embedded_partitions(
    layout: StorageLayout, clip_id: str, source_ids: list[str]
) -> list[Partition]:
    """Committed shards of ``source_ids`` that have embeddings of ``clip_id``, in order."""
    out = []
    for source in sorted(set(source_ids)):
        for shard in completed_shards(layout, source):
            if exists(layout.embedding_shard(clip_id, source, shard)):
                out.append((source, shard))
    return out


def current_version(layout: StorageLayout, clip_id: str) -> str | None:
    """The centroid version in use for ``clip_id``, or None before the first run."""
    path = layout.semdedup_current(clip_id)
    return read_json(path)["version"] if exists(path) else None


def read_state(layout: StorageLayout, clip_id: str, version: str) -> dict:
    """A version's committed state: settings and the partitions done (``{}`` if none)."""
    path = _version_file(layout, clip_id, version, "state.json")
    return read_json(path) if exists(path) else {}


def _version_file(layout: StorageLayout, clip_id: str, version: str, name: str) -> str:
    """Where a version's ``name`` is, for reading: its folder, or where stores written before
    kept it (the folder's full path repeated under the root) when only that exists."""
    path = layout.semdedup_version_file(clip_id, version, name)
    if exists(path):
        return path
    nested = layout.join(layout.semdedup_version(clip_id, version), name)
    return nested if exists(nested) else path


@dataclass
class _Batch:
    parts: list[Partition]
    offsets: np.ndarray  # row range of each partition in the arrays
    keys: list[str]
    x: np.ndarray  # float32 [N, D], unit rows
    scores: np.ndarray  # float32 [N]


def _load(layout: StorageLayout, clip_id: str, parts: list[Partition]) -> _Batch:
    """Keys, unit image embeddings and CLIP scores of ``parts``, in order.

    The float16 columns are widened into one float32 array filled in place, so the batch is held
    once (not as per-partition copies and their concatenation).
    """
    keys: list[str] = []
    half, scores, sizes = [], [], [0]
    for source, shard in parts:
        t = read_parquet(layout.embedding_shard(clip_id, source, shard), _COLUMNS)
        keys += t.column("key").to_pylist()
        half.append(t.column("image_embedding"))
        scores.append(t.column("clip_score").to_numpy().astype(np.float32))
        sizes.append(t.num_rows)
    offsets = np.cumsum(sizes)
    d = vector_dim(half[0].type) if half else 1
    x = np.empty((offsets[-1], d), np.float32)
    for column, lo, hi in zip(half, offsets[:-1], offsets[1:], strict=True):
        x[lo:hi] = vectors_to_numpy(column)
        x[lo:hi] /= np.maximum(np.linalg.norm(x[lo:hi], axis=1, keepdims=True), 1e-12)
    return _Batch(
        parts, offsets, keys, x, np.concatenate(scores) if scores else np.zeros(0, np.float32)
    )


def _priority(batch: _Batch, keep: str) -> np.ndarray:
    """Visit rank of each row: the keep rule, ties (and ``first_seen``) in batch order."""
    n = len(batch.keys)
    if keep == "first_seen":
        return np.arange(n)
    rank = np.empty(n, np.int64)
    rank[np.lexsort((np.arange(n), -batch.scores.astype(np.float64)))] = np.arange(n)
    return rank


def _settings(cfg: SemanticDedupConfig) -> dict:
    """What a version's removal lists depend on (not whether this run re-fits)."""
    return cfg.model_dump(mode="json", exclude={"recluster"})


def _version_name(centroids: np.ndarray, cfg: SemanticDedupConfig) -> str:
    h = hashlib.sha256(np.ascontiguousarray(centroids).tobytes())
    h.update(json.dumps(_settings(cfg), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _write_partitions(
    layout: StorageLayout,
    clip_id: str,
    version: str,
    batch: _Batch,
    clusters: np.ndarray,
    dup_of: np.ndarray,
    similarity: np.ndarray,
    bank: KeptBank | None,
) -> dict[str, dict]:
    """Each partition's removal list and kept members; returns its state entries."""
    global_keys = [
        f"{batch.parts[p][0]}/{batch.keys[i]}"
        for p in range(len(batch.parts))
        for i in range(batch.offsets[p], batch.offsets[p + 1])
    ]
    entries = {}
    for p, (source, shard) in enumerate(batch.parts):
        lo, hi = batch.offsets[p], batch.offsets[p + 1]
        of = dup_of[lo:hi]
        removed = np.flatnonzero(of != -1)
        kept = np.flatnonzero(of == -1)
        names = [global_keys[j] if j >= 0 else bank.name(-2 - j) for j in of[removed]]
        removals = pa.table(
            {
                "key": pa.array([batch.keys[lo + i] for i in removed], pa.string()),
                "duplicate_of": pa.array(names, pa.string()),
                "similarity": pa.array(similarity[lo:hi][removed], pa.float32()),
            }
        )
        buf = io.BytesIO()
        pq.write_table(removals, buf)
        with atomic_write(layout.semdedup_removals(clip_id, version, source, shard)) as f:
            f.write(buf.getvalue())
        kept_keys = [batch.keys[lo + i] for i in kept]
        write_kept(
            layout,
            clip_id,
            version,
            (source, shard),
            kept_keys,
            clusters[lo:hi][kept],
            batch.x[lo:hi][kept],
        )
        entries[partition_name((source, shard))] = {
            "rows": int(hi - lo),
            "removed": len(removed),
            "removals_sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
        }
    return entries


def _dedup_and_commit(
    layout: StorageLayout,
    clip_id: str,
    version: str,
    cfg: SemanticDedupConfig,
    batch: _Batch,
    centroids: np.ndarray,
    state: dict,
) -> dict[str, dict]:
    clusters = assign(batch.x, centroids) if len(batch.keys) else np.zeros(0, np.int32)
    done = sorted(state.get("partitions", {}))
    bank = read_bank(layout, clip_id, version, done, np.unique(clusters))
    found = find_duplicates(
        batch.x,
        clusters,
        _priority(batch, cfg.keep),
        cfg.similarity,
        bank.vectors if bank else None,
        bank.clusters if bank else None,
    )
    entries = _write_partitions(
        layout, clip_id, version, batch, clusters, found.of, found.similarity, bank
    )
    partitions = {**state.get("partitions", {}), **entries}
    new_state = {
        "version": version,
        "config": _settings(cfg),
        "clusters": int(len(centroids)),
        "fitted_on": state.get("fitted_on", sorted(entries)),
        "partitions": partitions,
    }
    write_json(layout.semdedup_version_file(clip_id, version, "state.json"), new_state)
    return entries


def _fit_version(
    layout: StorageLayout, clip_id: str, cfg: SemanticDedupConfig, batch: _Batch
) -> tuple[str, np.ndarray]:
    k = max(1, round(len(batch.keys) / cfg.cluster_size))
    centroids = fit_centroids(batch.x, k, cfg.iterations, cfg.seed, cfg.max_points_per_centroid)
    version = _version_name(centroids, cfg)
    buf = io.BytesIO()
    np.save(buf, centroids)
    with atomic_write(layout.semdedup_version_file(clip_id, version, "centroids.npy")) as f:
        f.write(buf.getvalue())
    return version, centroids


def read_centroids(layout: StorageLayout, clip_id: str, version: str) -> np.ndarray:
    """A version's frozen centroids (float32 [k, D], unit rows)."""
    fs, p = url_to_fs(_version_file(layout, clip_id, version, "centroids.npy"))
    with fs.open(p, "rb") as f:
        return np.load(io.BytesIO(f.read()))


def curate(
    layout: StorageLayout,
    clip_id: str,
    source_ids: list[str],
    cfg: SemanticDedupConfig,
    recluster: bool = False,
) -> CurationResult:
    """Bring the removal lists up to date: the first run (or ``recluster``) fits centroids on
    every partition; otherwise only partitions new since the last run are deduplicated."""
    start = time.time()
    parts = embedded_partitions(layout, clip_id, source_ids)
    if not parts:
        raise ValueError(f"semantic dedup: no embedded shards of CLIP {clip_id} in {source_ids}")
    lease = Lease(layout.lease("curation", clip_id), f"semantic dedup of CLIP {clip_id}")
    try:
        with lease.hold(wait_s=LEASE_WAIT_S):
            version = current_version(layout, clip_id)
            state = read_state(layout, clip_id, version) if version else {}
            if not recluster and state.get("config") not in (None, _settings(cfg)):
                log.warning(
                    "semantic dedup: version %s was made with other settings %s; they stay until "
                    "a re-cluster",
                    version,
                    state["config"],
                )
                cfg = SemanticDedupConfig.model_validate(state["config"])
            if version is None or recluster:
                batch = _load(layout, clip_id, parts)
                version, centroids = _fit_version(layout, clip_id, cfg, batch)
                entries = _dedup_and_commit(layout, clip_id, version, cfg, batch, centroids, {})
                write_json(layout.semdedup_current(clip_id), {"version": version})  # last
                reclustered = True
            else:
                new = [p for p in parts if partition_name(p) not in state.get("partitions", {})]
                if not new:
                    return CurationResult(
                        version, False, len(parts), 0, seconds=time.time() - start
                    )
                batch = _load(layout, clip_id, new)
                centroids = read_centroids(layout, clip_id, version)
                entries = _dedup_and_commit(layout, clip_id, version, cfg, batch, centroids, state)
                reclustered = False
    except LeaseHeld as e:
        raise RuntimeError(f"semantic dedup of CLIP {clip_id}: {e}") from None
    return CurationResult(
        version,
        reclustered,
        len(parts),
        len(batch.parts),
        len(batch.keys),
        sum(e["removed"] for e in entries.values()),
        time.time() - start,
        {name: e["removed"] for name, e in entries.items()},
    )


def removal_list(layout: StorageLayout, clip_id: str, part: Partition) -> pa.Table | None:
    """The partition's removal list in the version in use, or None if it is not curated yet."""
    version = current_version(layout, clip_id)
    if version is None:
        return None
    if partition_name(part) not in read_state(layout, clip_id, version).get("partitions", {}):
        return None
    return read_parquet(layout.semdedup_removals(clip_id, version, *part))


def removed_keys(layout: StorageLayout, clip_id: str) -> set[str]:
    """Global keys (``source/key``) every committed removal list of the version in use removes."""
    version = current_version(layout, clip_id)
    if version is None:
        return set()
    out: set[str] = set()
    for name in read_state(layout, clip_id, version).get("partitions", {}):
        source, shard = name.rsplit("/", 1)
        t = read_parquet(layout.semdedup_removals(clip_id, version, source, int(shard)), ["key"])
        out.update(f"{source}/{k}" for k in t.column("key").to_pylist())
    return out
