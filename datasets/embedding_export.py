"""Exporting a dataset version's embeddings in clip-retrieval's layout (what embedding-reader reads).

``img_emb/img_emb_{i:05d}.npy`` and ``text_emb/text_emb_{i:05d}.npy`` (float16 [N, D], L2-normalised),
``metadata/metadata_{i:05d}.parquet`` (``key``, ``caption``, ``url``, ``clip_score`` and the carried
metadata columns), one part per manifest shard, row i of each file the same sample. Only the rows
the manifest serves are exported. Parts are written one at a time through a temporary name and a
rename, so memory holds one shard and a killed export resumes at the first missing part;
``_export.json`` (written last) records what was exported.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .embedding_file import vectors_to_numpy
from .readers import load_manifest, read_embedding_table
from .served_rows import kept_mask
from .storage import StorageLayout, atomic_write, exists, read_json, write_json

EXPORT_RECORD = "_export.json"


def _npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x, dtype=np.float16))
    return buf.getvalue()


def _part_paths(out: str, i: int) -> dict[str, str]:
    return {
        "img": f"{out}/img_emb/img_emb_{i:05d}.npy",
        "text": f"{out}/text_emb/text_emb_{i:05d}.npy",
        "metadata": f"{out}/metadata/metadata_{i:05d}.parquet",
    }


def export_embeddings(layout: StorageLayout, version: str, out: str) -> dict[str, Any]:
    """Write dataset ``version``'s served embeddings to ``out`` (local or fsspec); the record."""
    out = out.rstrip("/")
    record_path = f"{out}/{EXPORT_RECORD}"
    if exists(record_path):
        done = read_json(record_path)
        if done.get("version") == version:
            return done
        raise ValueError(
            f"{record_path}: {out} holds dataset version {done.get('version')}, not {version}; "
            "export each version to a folder of its own"
        )
    manifest = load_manifest(layout, version)
    d = int(manifest["embedding_dim"])
    parts = []
    for i, entry in enumerate(manifest["shards"]):
        paths = _part_paths(out, i)
        if not all(exists(p) for p in paths.values()):
            table = read_embedding_table(layout, entry, manifest["clip_id"], d)
            keep = kept_mask(layout, table, manifest, entry)
            table = table.filter(pa.array(keep))
            # The metadata file is written last: its presence marks the part complete.
            with atomic_write(paths["img"]) as f:
                f.write(_npy_bytes(vectors_to_numpy(table.column("image_embedding"))))
            with atomic_write(paths["text"]) as f:
                f.write(_npy_bytes(vectors_to_numpy(table.column("text_embedding"))))
            meta = table.drop_columns(["image_embedding", "text_embedding"])
            with atomic_write(paths["metadata"]) as f:
                pq.write_table(meta.replace_schema_metadata(None), f, compression="zstd")
        parts.append({"part": i, "source": entry["source"], "shard": entry["shard"]})
    record = {
        "version": version,
        "clip_id": manifest["clip_id"],
        "embedding_dim": d,
        "num_samples": manifest["num_samples"],
        "parts": parts,
    }
    write_json(record_path, record)
    return record
