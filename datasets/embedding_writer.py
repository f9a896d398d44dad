"""Embed's write stage: one shard's encoded rows (any order, any batching) into its embedding
Parquet, written atomically, and the driver's gathering of rows until a shard is complete."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .clip import ClipBundle
from .embed_decode import COUNT_KEYS, read_shard_metadata
from .embedding_file import embedding_table, file_metadata, write_embedding_table
from .storage import StorageLayout, atomic_write

log = logging.getLogger(__name__)

# img2dataset's per-row bookkeeping: not carried into the embedding file.
_DROP_META = {"key", "caption", "url", "status", "error_message"}


@dataclass(frozen=True)
class FileInfo:
    """What the writer needs to know of the CLIP (not the model itself)."""

    clip_id: str
    embed_dim: int
    identity: dict[str, Any]

    @classmethod
    def of(cls, bundle: ClipBundle) -> FileInfo:
        """The writer's view of ``bundle``."""
        return cls(bundle.clip_id, bundle.embed_dim, bundle.identity)


def write_shard(
    layout: StorageLayout,
    info: FileInfo,
    source: str,
    shard: int,
    parts: list[dict[str, np.ndarray]],
) -> dict[str, int]:
    """Write one shard's embedding file from its encoded rows (any order); returns its counts."""
    end = [p for p in parts if p["end"].any()]
    if len(end) != 1:
        raise RuntimeError(f"embed {source}/{shard:05d}: {len(end)} end rows (expected 1)")
    e = end[0]["end"].argmax()
    counts = {k: int(end[0][k][e]) for k in COUNT_KEYS}
    errors = json.loads(end[0]["errors"][e])
    rows = {
        k: np.concatenate([p[k][~p["end"]] for p in parts])
        for k in (
            "index",
            "key",
            "caption",
            "meta_json",
            "image_embedding",
            "text_embedding",
            "clip_score",
        )
    }
    if len(rows["index"]) != counts["samples"]:
        raise RuntimeError(
            f"embed {source}/{shard:05d}: {len(rows['index'])} samples encoded, "
            f"{counts['samples']} decoded"
        )
    order = np.argsort(rows["index"], kind="stable")
    rows = {k: v[order] for k, v in rows.items()}
    keys = [str(k) for k in rows["key"]]
    d = info.embed_dim

    meta_table = read_shard_metadata(layout, source, shard)
    if meta_table is not None:
        row_of = {k: i for i, k in enumerate(meta_table.column("key").to_pylist()) if k is not None}
        meta = meta_table.take(pa.array([row_of[k] for k in keys], pa.int64()))
    elif keys:
        meta = pa.Table.from_pylist([json.loads(m) for m in rows["meta_json"]])
    else:
        meta = pa.table({"url": pa.array([], pa.string())})
    if "url" not in meta.column_names:
        meta = meta.append_column("url", pa.nulls(len(keys), pa.string()))
    carried = meta.drop_columns([c for c in meta.column_names if c in _DROP_META])
    table = embedding_table(
        keys,
        [str(c) for c in rows["caption"]],
        meta.column("url"),
        rows["image_embedding"].reshape(-1, d),
        rows["text_embedding"].reshape(-1, d),
        rows["clip_score"],
        carried,
    )
    table = table.replace_schema_metadata(
        file_metadata(info.clip_id, d, info.identity, source, shard)
    )
    with atomic_write(layout.embedding_shard(info.clip_id, source, shard)) as f:
        write_embedding_table(table, f)
    if counts["corrupt"] or counts["truncated_tar"] or counts["not_in_metadata"]:
        log.warning(
            "embed %s/%05d: skipped %d corrupt, %d truncated tar, %d not in metadata (%s)",
            source,
            shard,
            counts["corrupt"],
            counts["truncated_tar"],
            counts["not_in_metadata"],
            errors[:3],
        )
    return {"written": 1, **counts}


class ShardGather:
    """Driver side of stage 3: rows per shard until the shard is complete, then its file."""

    def __init__(self, layout: StorageLayout, info: FileInfo, source: str) -> None:
        self.layout, self.info, self.source = layout, info, source
        self.parts: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
        self.have: dict[int, int] = defaultdict(int)
        self.expected: dict[int, int] = {}
        self.results: list[dict[str, int]] = []

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Keep ``batch``'s rows by shard; write every shard they complete."""
        shards = batch["shard"]
        for shard in np.unique(shards):
            sel = shards == shard
            part = {k: v[sel] for k, v in batch.items()}
            s = int(shard)
            self.parts[s].append(part)
            ends = part["end"]
            self.have[s] += int((~ends).sum())
            if ends.any():
                self.expected[s] = int(part["samples"][ends.argmax()])
            if self.expected.get(s) == self.have[s]:
                self.results.append(
                    write_shard(self.layout, self.info, self.source, s, self.parts.pop(s))
                )

    def unfinished(self) -> list[int]:
        """Shards with rows received but not yet written."""
        return sorted(self.parts)
