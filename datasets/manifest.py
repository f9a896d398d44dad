"""The dataset manifest: every shard that has both images and embeddings, named by a content hash.

``version`` hashes the CLIP id and the sorted shard list with each embedding file's sha256, so
the same content always gives the same version (and the same manifest bytes), and adding or
changing a shard gives a new one. The embedding mean / std the prior normalises with are written
next to it (``{version}.stats.npz``) before the manifest, so a manifest implies its stats.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from .readers import check_embedding_metadata, fixed_list_to_numpy
from .shards import completed_shards
from .storage import StorageLayout, atomic_write, exists, read_json, write_json


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


def assemble_manifest(layout: StorageLayout, clip_id: str, source_ids: list[str]) -> dict[str, Any]:
    """Write (if new) and return the manifest over every shard of ``source_ids`` with embeddings."""
    shards: list[dict[str, Any]] = []
    image_m, text_m = _Moments(), _Moments()
    dim: int | None = None
    for source in sorted(set(source_ids)):
        for shard in completed_shards(layout, source):
            emb_path = layout.embedding_shard(clip_id, source, shard)
            fs, p = url_to_fs(emb_path)
            if not fs.exists(p):
                continue  # not embedded yet: the next assemble picks it up
            with fs.open(p, "rb") as f:
                data = f.read()
            try:
                table = pq.read_table(
                    pa.BufferReader(data), columns=["image_embedding", "text_embedding"]
                )
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(
                    f"{emb_path}: unreadable embedding Parquet ({e}); delete it to re-embed the shard"
                ) from e
            meta = table.schema.metadata or {}
            file_dim = int(meta.get(b"unclip.embedding_dim", b"0"))
            check_embedding_metadata(emb_path, table.schema, clip_id, dim or file_dim)
            dim = dim or file_dim
            if table.num_rows:
                image_m.add(fixed_list_to_numpy(table.column("image_embedding")))
                text_m.add(fixed_list_to_numpy(table.column("text_embedding")))
            shards.append(
                {
                    "source": source,
                    "shard": shard,
                    "images": _rel(layout, layout.image_shard(source, shard)),
                    "embeddings": _rel(layout, emb_path),
                    "count": table.num_rows,
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
    if not shards:
        raise ValueError(
            f"no shards with embeddings for CLIP {clip_id} in sources {sorted(set(source_ids))}"
        )
    content = json.dumps({"clip_id": clip_id, "shards": shards}, sort_keys=True).encode()
    version = hashlib.sha256(content).hexdigest()[:16]
    manifest = {
        "version": version,
        "clip_id": clip_id,
        "embedding_dim": dim,
        "num_samples": sum(s["count"] for s in shards),
        "shards": shards,
        "stats": _rel(layout, layout.embedding_stats(version)),
    }
    if not exists(layout.embedding_stats(version)):
        image_mean, image_std = image_m.mean_std()
        text_mean, text_std = text_m.mean_std()
        buf = io.BytesIO()
        np.savez(
            buf, image_mean=image_mean, image_std=image_std, text_mean=text_mean, text_std=text_std
        )
        with atomic_write(layout.embedding_stats(version)) as f:
            f.write(buf.getvalue())
    if not exists(layout.manifest(version)):
        write_json(layout.manifest(version), manifest)
    pointer = layout.latest_manifest_pointer()
    if not exists(pointer) or read_json(pointer).get("version") != version:
        write_json(pointer, {"version": version})
    return manifest


def latest_manifest(layout: StorageLayout) -> dict[str, Any] | None:
    """The manifest assembled last, or None if there is none."""
    pointer = layout.latest_manifest_pointer()
    if not exists(pointer):
        return None
    version = read_json(pointer)["version"]
    path = layout.manifest(version)
    return read_json(path) if exists(path) else None
