"""The dataset manifest: every shard that has both images and embeddings, named by a content hash.

A source imported with embeddings only (``embedding_import``) is listed with ``images: null``.
``version`` hashes the CLIP id and the sorted shard list with each embedding file's sha256, so
the same content always gives the same version (and the same manifest bytes), and adding or
changing a shard gives a new one. The embedding mean / std the prior normalises with are written
next to it (``{version}.stats.npz``) before the manifest, so a manifest implies its stats.

The optional CLIP-score filter (:class:`ManifestConfig`: a threshold as in LAION, a top fraction
as in DataComp) resolves to one threshold, ``clip_score_min``; the manifest then lists each
shard's kept ``count`` beside its ``rows``, and readers serve only rows at or above it. Files
are never rewritten. A filter that keeps everything gives the unfiltered version.

Curation (``manifest_curation.py``: semantic dedup's removal lists and a named filter recipe)
adds per shard a ``removed`` file of the keys left out, with its sha256, and a ``curation``
block (recipe, resolved thresholds, heads, semantic-dedup version), all hashed into the version;
the kept fractions by filter go to ``{version}.filters.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from .config import ManifestConfig
from .embedding_file import check_embedding_schema, vectors_to_numpy
from .embedding_import import imported_shards
from .manifest_curation import select_rows
from .readers import served_tables
from .served_rows import removal_file_keys
from .shards import completed_shards
from .storage import StorageLayout, atomic_write, exists, read_json, write_json

log = logging.getLogger(__name__)


def _rel(layout: StorageLayout, path: str) -> str:
    return path[len(layout.root) :].lstrip("/")


class _Moments:
    """Running sum / sum of squares in float64, for mean and std over all samples."""

    def __init__(self) -> None:
        self.n = 0
        self.s: np.ndarray | None = None
        self.ss: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        x = x.astype(np.float64)
        self.n += len(x)
        s, ss = x.sum(0), (x * x).sum(0)
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.s / max(self.n, 1)
        var = np.maximum(self.ss / max(self.n, 1) - mean * mean, 0.0)
        return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


@dataclass
class _Entry:
    source: str
    shard: int
    path: str
    sha256: str
    dim: int
    scores: np.ndarray  # clip_score, float32 [rows]
    has_images: bool = True


def _read_entry(layout: StorageLayout, clip_id: str, source: str, shard: int) -> _Entry | None:
    """The shard's embedding file checked (identity, dimension, schema), or None if not embedded."""
    emb_path = layout.embedding_shard(clip_id, source, shard)
    fs, p = url_to_fs(emb_path)
    if not fs.exists(p):
        return None
    with fs.open(p, "rb") as f:
        data = f.read()
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        dim = check_embedding_schema(emb_path, pf.schema_arrow, clip_id, None)
        scores = pf.read(columns=["clip_score"]).column("clip_score").to_numpy()
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(
            f"{emb_path}: unreadable embedding Parquet ({e}); delete it to re-embed the shard"
        ) from e
    return _Entry(source, shard, emb_path, hashlib.sha256(data).hexdigest(), dim, scores)


def _threshold(entries: list[_Entry], cfg: ManifestConfig) -> float | None:
    """The resolved CLIP-score threshold, or None when the filter keeps every sample."""
    if cfg.clip_score_min is None and cfg.clip_score_top_fraction is None:
        return None
    scores = np.concatenate([e.scores for e in entries]).astype(np.float64)
    if not len(scores):
        return None
    threshold = -np.inf if cfg.clip_score_min is None else float(cfg.clip_score_min)
    if cfg.clip_score_top_fraction is not None:
        k = max(1, math.ceil(cfg.clip_score_top_fraction * len(scores)))
        threshold = max(threshold, float(np.partition(scores, len(scores) - k)[len(scores) - k]))
    if (scores >= threshold).all():
        return None  # same content as no filter: same version
    return threshold


def assemble_manifest(
    layout: StorageLayout,
    clip_id: str,
    source_ids: list[str],
    cfg: ManifestConfig | None = None,
) -> dict[str, Any]:
    """Write (if new) and return the manifest over every shard of ``source_ids`` with embeddings.

    ``cfg`` sets the optional CLIP-score filter; it decides which rows the manifest serves
    (``clip_score_min`` and per-shard ``count``), never which files exist.
    """
    cfg = cfg or ManifestConfig()
    entries: list[_Entry] = []
    not_embedded: list[str] = []
    for source in sorted(set(source_ids)):
        image_shards = completed_shards(layout, source)
        # An imported source has embeddings only: it serves the prior, never the decoder.
        for shard in image_shards or imported_shards(layout, clip_id, source):
            entry = _read_entry(layout, clip_id, source, shard)
            if entry is None:  # not embedded yet: the next assemble picks it up
                not_embedded.append(f"{source}/{shard:05d}")
            else:
                entry.has_images = bool(image_shards)
                entries.append(entry)
    if not entries:
        raise ValueError(
            f"no shards with embeddings for CLIP {clip_id} in sources {sorted(set(source_ids))}"
        )
    if not_embedded:
        log.warning(
            "manifest: %d image shards have no embeddings for CLIP %s yet and are left out: %s",
            len(not_embedded),
            clip_id,
            not_embedded[:5],
        )
    dims = {e.dim for e in entries}
    if len(dims) > 1:
        raise ValueError(f"CLIP {clip_id}: embedding files of dimensions {sorted(dims)}")
    selection = select_rows(layout, clip_id, [(e.source, e.shard) for e in entries], cfg)
    if selection is not None and selection.uncurated:
        log.warning(
            "manifest: %d shards are not through semantic dedup yet and are left out: %s",
            len(selection.uncurated),
            selection.uncurated[:5],
        )
        left_out = set(selection.uncurated)
        entries = [e for e in entries if f"{e.source}/{e.shard:05d}" not in left_out]
        if not entries:
            raise ValueError(f"no shards of CLIP {clip_id} are through semantic dedup yet")
    threshold = _threshold(entries, cfg)
    shards: list[dict[str, Any]] = []
    for e in entries:
        item = {
            "source": e.source,
            "shard": e.shard,
            "images": _rel(layout, layout.image_shard(e.source, e.shard)) if e.has_images else None,
            "embeddings": _rel(layout, e.path),
            "count": len(e.scores),
            "sha256": e.sha256,
        }
        kept = np.ones(len(e.scores), bool)
        if threshold is not None:
            kept &= e.scores.astype(np.float64) >= threshold
        removed = selection.removed.get(f"{e.source}/{e.shard:05d}") if selection else None
        if removed is not None:
            path, digest, _ = removed
            item["removed"], item["removed_sha256"] = _rel(layout, path), digest
            kept &= ~_removed_rows(layout, e, path)
        if threshold is not None or removed is not None:
            item["rows"] = len(e.scores)
            item["count"] = int(kept.sum())
        shards.append(item)
    content: dict[str, Any] = {"clip_id": clip_id, "shards": shards}
    if threshold is not None:
        content["clip_score_min"] = threshold
    if selection is not None:
        content["curation"] = selection.content
    version = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    manifest = {
        "version": version,
        "clip_id": clip_id,
        "embedding_dim": entries[0].dim,
        "num_samples": sum(s["count"] for s in shards),
        "shards": shards,
        "stats": _rel(layout, layout.embedding_stats(version)),
    }
    if threshold is not None:
        manifest["clip_score_min"] = threshold
    if selection is not None:
        if not manifest["num_samples"]:
            raise ValueError(
                f"manifest: recipe {cfg.recipe!r} and semantic dedup leave no sample of CLIP "
                f"{clip_id} (kept fractions: {selection.kept_fractions})"
            )
        manifest["curation"] = selection.content
        report = layout.manifest_filter_report(version)
        if not exists(report):
            write_json(report, {"recipe": cfg.recipe, "partitions": selection.kept_fractions})
    _write_stats(layout, manifest)
    if not exists(layout.manifest(version)):
        write_json(layout.manifest(version), manifest)
    pointer = layout.latest_manifest_pointer()
    if not exists(pointer) or read_json(pointer).get("version") != version:
        write_json(pointer, {"version": version})
    return manifest


def _removed_rows(layout: StorageLayout, entry: _Entry, removed_path: str) -> np.ndarray:
    """True for each row of the entry's embedding file that the removal file lists."""
    fs, p = url_to_fs(entry.path)
    with fs.open(p, "rb") as f:
        keys = pq.read_table(f, columns=["key"]).column("key")
    return np.asarray(
        pc.is_in(keys, value_set=removal_file_keys(removed_path)).to_numpy(zero_copy_only=False)
    )


def _write_stats(layout: StorageLayout, manifest: dict[str, Any]) -> None:
    """Write the served rows' embedding mean / std, unless this version's stats exist."""
    path = layout.embedding_stats(manifest["version"])
    if exists(path):
        return
    image_m, text_m = _Moments(), _Moments()
    columns = ["key", "image_embedding", "text_embedding", "clip_score"]
    for _, table, keep in served_tables(layout, manifest, columns):
        if keep.any():
            image_m.add(vectors_to_numpy(table.column("image_embedding"))[keep])
            text_m.add(vectors_to_numpy(table.column("text_embedding"))[keep])
    image_mean, image_std = image_m.mean_std()
    text_mean, text_std = text_m.mean_std()
    buf = io.BytesIO()
    np.savez(
        buf, image_mean=image_mean, image_std=image_std, text_mean=text_mean, text_std=text_std
    )
    with atomic_write(path) as f:
        f.write(buf.getvalue())


def latest_manifest(layout: StorageLayout) -> dict[str, Any] | None:
    """The manifest assembled last, or None if there is none."""
    pointer = layout.latest_manifest_pointer()
    if not exists(pointer):
        return None
    version = read_json(pointer)["version"]
    path = layout.manifest(version)
    return read_json(path) if exists(path) else None
