"""The curation a manifest applies: semantic dedup's removal lists and a filter recipe.

For each shard it writes the rows left out (``key``, ``filter``) as a Parquet file named by its
sha256 under ``manifests/removed/`` (so a file is never rewritten, and the manifest entry's
``removed`` / ``removed_sha256`` are part of the dataset version), and returns what the version
hashes besides: the recipe, its resolved top-fraction thresholds, the heads' sha256 and the
semantic-dedup version. Readers leave the listed keys out (``served_rows.kept_mask``).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from .config import ManifestConfig
from .duplicate_groups import assign
from .embedding_file import vector_dim, vectors_to_numpy
from .recipes import PartitionInput, apply_recipe
from .scores import load_head, partition_scores
from .semantic_dedup import current_version, partition_name, read_centroids, read_state
from .storage import StorageLayout, atomic_write, exists, read_parquet


@dataclass
class Selection:
    """The curation of one manifest: rows left out per partition, and what names it."""

    removed: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # name -> (path, sha, n)
    content: dict[str, Any] = field(default_factory=dict)  # hashed into the version
    kept_fractions: dict[str, dict[str, float]] = field(default_factory=dict)
    uncurated: list[str] = field(default_factory=list)  # partitions semantic dedup has not done


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _reference_clusters(path: str, centroids: np.ndarray) -> tuple[np.ndarray, str]:
    """The centroids nearest to some reference embedding, and the reference file's sha256."""
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"recipe clusters_near: no reference embeddings at {path}")
    with fs.open(p, "rb") as f:
        data = f.read()
    refs = np.load(io.BytesIO(data)).astype(np.float32)
    if refs.ndim != 2 or refs.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"recipe clusters_near: {path} holds {refs.shape}, expected [M, {centroids.shape[1]}]"
        )
    return np.unique(assign(_unit(refs), centroids)), hashlib.sha256(data).hexdigest()


def _write_removed(layout: StorageLayout, rows: list[tuple[str, str]]) -> tuple[str, str]:
    table = pa.table(
        {
            "key": pa.array([k for k, _ in rows], pa.string()),
            "filter": pa.array([f for _, f in rows], pa.string()),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path = layout.manifest_removals(digest)
    if not exists(path):
        with atomic_write(path) as f:
            f.write(data)
    return path, digest


def select_rows(
    layout: StorageLayout, clip_id: str, partitions: list[tuple[str, int]], cfg: ManifestConfig
) -> Selection | None:
    """The rows ``cfg`` leaves out of each partition, or None when it applies no curation."""
    recipe = cfg.recipes[cfg.recipe] if cfg.recipe is not None else None
    if recipe is None and not cfg.semantic_dedup:
        return None
    selection = Selection()
    version = current_version(layout, clip_id)
    state = read_state(layout, clip_id, version) if version else {}
    done = state.get("partitions", {})
    if cfg.semantic_dedup:
        selection.uncurated = [
            partition_name(p) for p in partitions if partition_name(p) not in done
        ]
        partitions = [p for p in partitions if partition_name(p) in done]
    centroids, wanted, reference_sha = None, None, None
    if recipe is not None and recipe.clusters_near is not None:
        if version is None:
            raise ValueError(
                f"manifest recipe {cfg.recipe!r}: clusters_near needs semantic dedup's centroids "
                f"of CLIP {clip_id}; run the curate stage first"
            )
        centroids = read_centroids(layout, clip_id, version)
        wanted, reference_sha = _reference_clusters(recipe.clusters_near, centroids)
    d = None
    heads = {}
    parts: dict[str, PartitionInput] = {}
    for source, shard in partitions:
        t = read_parquet(
            layout.embedding_shard(clip_id, source, shard),
            ["key", "caption", "clip_score", "image_embedding"],
        )
        if d is None:
            d = vector_dim(t.schema.field("image_embedding").type)
            heads = {name: load_head(path, d) for name, path in cfg.heads.items()}
        scores = partition_scores(layout, t, source, shard, heads if recipe is not None else {})
        part = PartitionInput(scores)
        name = partition_name((source, shard))
        if cfg.semantic_dedup:
            removals = read_parquet(
                layout.semdedup_removals(clip_id, version, source, shard), ["key"]
            )
            part.semdedup_removed = set(removals.column("key").to_pylist())
        if centroids is not None:
            x = _unit(vectors_to_numpy(t.column("image_embedding")))
            part.near_reference = np.isin(assign(x, centroids), wanted)
        parts[name] = part
    result = apply_recipe(recipe, parts)
    for name, rows in result.removed.items():
        if rows:
            path, digest = _write_removed(layout, rows)
            selection.removed[name] = (path, digest, len(rows))
    selection.kept_fractions = result.kept_fractions
    selection.content = {
        "recipe": cfg.recipe,
        "recipe_config": recipe.model_dump(mode="json") if recipe is not None else None,
        "resolved": result.resolved,
        "heads": {name: h.sha256 for name, h in sorted(heads.items())}
        if recipe is not None
        else {},
        "semantic_dedup": version if cfg.semantic_dedup or centroids is not None else None,
        "references_sha256": reference_sha,
    }
    return selection
