"""Embed: CLIP over image shards into one Parquet file per shard, only where none exists yet.

Runs as Ray Data over the list of pending shards with an actor pool: each actor loads the CLIP
once and, per call, reads one tar, encodes its images and captions in batches under
``torch.no_grad`` and writes ``embeddings/{clip_id}/{source}/{shard}.parquet`` atomically.
Schema (architecture.md): key, caption, url, image_embedding / text_embedding as
``fixed_size_list<float16>[D]`` (L2-normalised), clip_score float32, then the shard's metadata
columns; file metadata ``unclip.clip_id`` / ``unclip.embedding_dim`` / ``unclip.identity``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from fsspec.core import url_to_fs

from .clip import ClipBundle, encode_images, encode_texts, load_clip
from .config import ClipConfig, EmbedConfig
from .ingest import shard_parquet_path
from .shards import ShardReadStats, completed_shards, iter_shard
from .storage import StorageLayout, atomic_write, exists, write_json

log = logging.getLogger(__name__)

PIPELINE_VERSION = "1"
# img2dataset's per-row bookkeeping: not carried into the embedding file.
_DROP_META = {"key", "caption", "url", "status", "error_message"}
_OURS = {"key", "caption", "url", "image_embedding", "text_embedding", "clip_score"}


@dataclass
class EmbedResult:
    shards_written: int
    shards_skipped: int
    clip_id: str
    samples: int = 0
    skipped_samples: dict[str, int] = field(default_factory=dict)


def pending_shards(layout: StorageLayout, clip_id: str, source_id: str) -> list[int]:
    """Committed image shards of ``source_id`` with no embedding file for ``clip_id``."""
    return [
        s
        for s in completed_shards(layout, source_id)
        if not exists(layout.embedding_shard(clip_id, source_id, s))
    ]


def _fixed_list(x: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).reshape(-1)), x.shape[1])


def _shard_metadata(layout: StorageLayout, source: str, shard: int) -> pa.Table | None:
    """img2dataset's per-row Parquet of the shard (None if absent)."""
    path = shard_parquet_path(layout, source, shard)
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        return None
    with fs.open(p, "rb") as f:
        return pq.read_table(f)


def embed_shard(
    layout: StorageLayout, bundle: ClipBundle, source: str, shard: int, batch_size: int
) -> dict[str, int]:
    """Embed one image shard and write its Parquet; returns counts (written, skipped...)."""
    out = layout.embedding_shard(bundle.clip_id, source, shard)
    if exists(out):
        return {"written": 0, "samples": 0}
    meta_table = _shard_metadata(layout, source, shard)
    row_of = (
        {k: i for i, k in enumerate(meta_table.column("key").to_pylist()) if k is not None}
        if meta_table is not None
        else None
    )
    stats = ShardReadStats()
    keys: list[str] = []
    captions: list[str] = []
    rows: list[int] = []  # row of each kept sample in meta_table
    metas: list[dict[str, Any]] = []  # the tar's JSON, used when the Parquet is missing
    img_emb: list[np.ndarray] = []
    txt_emb: list[np.ndarray] = []
    not_in_meta = 0
    images: list[Any] = []

    def flush() -> None:
        if images:
            img_emb.append(encode_images(bundle, images))
            images.clear()

    for s in iter_shard(layout.image_shard(source, shard), stats):
        if row_of is not None:
            row = row_of.get(s.key)
            if row is None:  # a key in the tar but not in the shard's metadata
                not_in_meta += 1
                continue
            rows.append(row)
        keys.append(s.key)
        captions.append(s.caption)
        metas.append(s.meta)
        images.append(s.image)
        if len(images) >= batch_size:
            flush()
    flush()
    for i in range(0, len(captions), batch_size):
        txt_emb.append(encode_texts(bundle, captions[i : i + batch_size]))

    d = bundle.embed_dim
    ie = np.concatenate(img_emb) if img_emb else np.zeros((0, d), np.float32)
    te = np.concatenate(txt_emb) if txt_emb else np.zeros((0, d), np.float32)
    if meta_table is not None:
        meta = meta_table.take(pa.array(rows, pa.int64()))
    else:
        meta = (
            pa.Table.from_pylist(metas) if metas else pa.table({"url": pa.array([], pa.string())})
        )
    cols: dict[str, pa.Array] = {
        "key": pa.array(keys, pa.string()),
        "caption": pa.array(captions, pa.string()),
        "url": meta.column("url").cast(pa.string()),
        "image_embedding": _fixed_list(ie),
        "text_embedding": _fixed_list(te),
        "clip_score": pa.array((ie * te).sum(axis=1).astype(np.float32), pa.float32()),
    }
    table = pa.table(cols)
    for name in meta.column_names:
        if name not in _DROP_META and name not in _OURS:
            table = table.append_column(name, meta.column(name))
    table = table.replace_schema_metadata(
        {
            "unclip.clip_id": bundle.clip_id,
            "unclip.embedding_dim": str(d),
            # without "source": where the checkpoint lives must not change the file's bytes
            "unclip.identity": json.dumps(
                {k: v for k, v in bundle.identity.items() if k != "source"},
                sort_keys=True,
                default=str,
            ),
            "unclip.pipeline_version": PIPELINE_VERSION,
            "unclip.source": source,
            "unclip.shard": str(shard),
        }
    )
    with atomic_write(out) as f:
        pq.write_table(table, f)
    if stats.corrupt or stats.truncated or not_in_meta:
        log.warning(
            "embed %s/%05d: skipped %d corrupt, %d truncated tar, %d not in metadata (%s)",
            source,
            shard,
            stats.corrupt,
            stats.truncated,
            not_in_meta,
            stats.errors[:3],
        )
    return {
        "written": 1,
        "samples": len(keys),
        "corrupt": stats.corrupt,
        "truncated_tar": stats.truncated,
        "not_in_metadata": not_in_meta,
    }


class EmbedShardActor:
    """Ray Data actor: loads the CLIP once, embeds one shard per row of its batch."""

    def __init__(
        self, root: str, clip_cfg: ClipConfig, checkpoint: str | None, cfg: EmbedConfig
    ) -> None:
        import torch

        self.layout = StorageLayout(root)
        self.bundle = load_clip(clip_cfg, checkpoint, device=cfg.device)
        self.batch_size = cfg.batch_size
        torch.set_grad_enabled(False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts: list[dict[str, int]] = []
        for source, shard in zip(batch["source"], batch["shard"], strict=True):
            counts.append(
                embed_shard(self.layout, self.bundle, str(source), int(shard), self.batch_size)
            )
        out = {k: np.array([c.get(k, 0) for c in counts]) for k in _COUNT_KEYS}
        out["source"] = np.array(batch["source"])
        out["shard"] = np.array(batch["shard"])
        return out


_COUNT_KEYS = ("written", "samples", "corrupt", "truncated_tar", "not_in_metadata")


def embed_source(
    layout: StorageLayout,
    source_id: str,
    clip_cfg: ClipConfig,
    clip_checkpoint: str | None,
    cfg: EmbedConfig,
) -> EmbedResult:
    """Embed every committed image shard of ``source_id`` that has no embeddings for this CLIP."""
    bundle = load_clip(clip_cfg, clip_checkpoint)
    clip_id = bundle.clip_id
    identity_path = f"{layout.clip_dir(clip_id)}/identity.json"
    if not exists(identity_path):
        write_json(identity_path, {"clip_id": clip_id, **bundle.identity})
    del bundle
    all_shards = completed_shards(layout, source_id)
    pending = pending_shards(layout, clip_id, source_id)
    result = EmbedResult(0, len(all_shards) - len(pending), clip_id)
    if not pending:
        return result

    remote_args: dict[str, Any] = {"num_gpus": 1} if cfg.device == "cuda" else {"num_cpus": 1}
    ds = ray.data.from_items([{"source": source_id, "shard": s} for s in pending]).map_batches(
        EmbedShardActor,
        fn_constructor_args=(layout.root, clip_cfg, clip_checkpoint, cfg),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=max(1, min(cfg.num_actors, len(pending)))),
        **remote_args,
    )
    rows = ds.take_all()
    result.shards_written = int(sum(r["written"] for r in rows))
    result.samples = int(sum(r["samples"] for r in rows))
    result.skipped_samples = {
        k: int(sum(r[k] for r in rows)) for k in ("corrupt", "truncated_tar", "not_in_metadata")
    }
    return result
