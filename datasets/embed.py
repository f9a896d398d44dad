"""Embed: CLIP over image shards into one Parquet file per shard, only where none exists yet.

This module decides what to embed and runs it (:func:`embed_source` on Ray Data,
:func:`embed_shard` in this process); each stage has its own module:

1. **decode** (:mod:`.embed_decode`, preprocessing in :mod:`.clip_preprocess`) — read a shard's
   tar, drop keys missing from the shard's metadata, decode, preprocess (batched, bit-identical
   to open_clip's transform) and tokenize, in chunks of ``batch_size`` samples, counting what
   was skipped (samples, corrupt, truncated, ...);
2. **encode** (:mod:`.embed_encode`) — ``encode_image`` + ``encode_text`` per chunk (with
   ``dedup_captions`` each distinct caption of a chunk is encoded once). Where it runs is
   ``embed.pipeline`` (:mod:`.embed_ray_data`):

   - *fused* (the CPU default): in the decode task itself, with the worker's cached CLIP.
     No pixels cross the object store, every CPU both decodes and encodes on its own torch
     thread, and a single Ray Data operator has nothing to wait for;
   - *split* (GPU, or chosen on CPU): decode tasks yield column batches with pixels and tokens
     plus an end-of-shard row to a pool of encoders — on GPU an actor pool (one model resident
     per GPU), on CPU tasks in Ray's reused workers with the cached CLIP;
3. **write** (:mod:`.embedding_writer`) — the driver gathers rows per shard and, once a
   shard's end row and all its samples are in, writes
   ``embeddings/{clip_id}/{source}/{shard}.parquet`` atomically, so a killed run keeps every
   shard it finished.

The file format is :mod:`.embedding_file`'s; an existing file is trusted only if its footer
reads back with this CLIP's id, so a file truncated by a killed writer elsewhere is embedded
again.
"""

from __future__ import annotations

import logging
import time

from .clip import ClipBundle, load_clip
from .config import ClipConfig, EmbedConfig
from .embed_decode import COUNT_KEYS, DecodeSpec
from .embed_encode import encode_shard
from .embed_ray_data import embedding_dataset
from .embedding_shards import (
    EmbedResult,
    clip_identity_path,
    existing_embeddings_ok,
    pending_shards,
)
from .embedding_writer import FileInfo, ShardGather, write_shard
from .progress_records import progress_extra
from .ray_runtime import ensure_started
from .shards import completed_shards
from .storage import StorageLayout, exists, write_json

__all__ = ["embed_shard", "embed_source"]

log = logging.getLogger(__name__)


def embed_shard(
    layout: StorageLayout,
    bundle: ClipBundle,
    source: str,
    shard: int,
    batch_size: int,
    dedup_captions: bool = True,
) -> dict[str, int]:
    """Embed one image shard in this process (decode, encode, write); returns its counts."""
    if existing_embeddings_ok(
        layout.embedding_shard(bundle.clip_id, source, shard), bundle.clip_id
    ):
        return {"written": 0, "samples": 0}
    rows = encode_shard(
        layout, bundle, source, shard, DecodeSpec.of(bundle, batch_size, dedup_captions)
    )
    return write_shard(layout, FileInfo.of(bundle), source, shard, [rows])


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
    identity_path = clip_identity_path(layout, clip_id)
    if not exists(identity_path):
        write_json(identity_path, {"clip_id": clip_id, **bundle.identity})
    all_shards = completed_shards(layout, source_id)
    pending = pending_shards(layout, clip_id, source_id, all_shards)
    redone = [
        layout.embedding_shard(clip_id, source_id, s)
        for s in pending
        if exists(layout.embedding_shard(clip_id, source_id, s))
    ]
    result = EmbedResult(0, len(all_shards) - len(pending), clip_id, redone=redone)
    if not pending:
        return result

    info = FileInfo.of(bundle)
    ensure_started()
    ds = embedding_dataset(layout, source_id, pending, clip_cfg, clip_checkpoint, cfg, bundle)
    del bundle  # from here the driver only writes: its model need not stay loaded
    gather = ShardGather(layout, info, source_id)
    started, images = time.monotonic(), 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        finished = len(gather.results)
        gather.add(batch)
        if len(gather.results) > finished:
            done = result.shards_skipped + len(gather.results)
            images += sum(r["samples"] for r in gather.results[finished:])
            rate = images / max(time.monotonic() - started, 1e-9)
            log.info(
                "embed %s: %d/%d shards done, %d images, %.1f images/s",
                source_id,
                done,
                len(all_shards),
                images,
                rate,
                extra=progress_extra(f"embed {source_id}", done, len(all_shards)),
            )
    if gather.unfinished():
        raise RuntimeError(f"embed {source_id}: shards {gather.unfinished()} never completed")
    result.shards_written = sum(r["written"] for r in gather.results)
    result.samples = sum(r["samples"] for r in gather.results)
    result.skipped_samples = {
        k: sum(r[k] for r in gather.results) for k in COUNT_KEYS if k != "samples"
    }
    return result
