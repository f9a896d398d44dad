"""Which image shards of a source have a complete embedding file of a CLIP, read from the files'
footers: a source with nothing to embed is found without loading torch or the CLIP.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from .embedding_file import check_embedding_metadata
from .shards import completed_shards
from .storage import StorageLayout, exists

log = logging.getLogger(__name__)


@dataclass
class EmbedResult:
    """What an embed run of one source did."""

    shards_written: int
    shards_skipped: int
    clip_id: str
    samples: int = 0
    skipped_samples: dict[str, int] = field(default_factory=dict)
    redone: list[str] = field(default_factory=list)  # unreadable files embedded again


def existing_embeddings_ok(path: str, clip_id: str) -> bool:
    """Whether ``path`` holds a complete embedding file of ``clip_id``.

    Missing or unreadable (a truncated file has no footer): False, and it is embedded again.
    Readable but written by another CLIP: an error naming the file, since it is not ours to
    overwrite.
    """
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        return False
    try:
        with fs.open(p, "rb") as f:
            schema = pq.read_schema(f)
    except (pa.ArrowInvalid, OSError) as e:
        log.warning("%s: unreadable embedding Parquet (%s); embedding the shard again", path, e)
        return False
    check_embedding_metadata(path, schema, clip_id, None)
    return True


def pending_shards(
    layout: StorageLayout, clip_id: str, source_id: str, shards: list[int] | None = None
) -> list[int]:
    """Committed image shards of ``source_id`` (``shards`` when the caller has listed them)
    with no complete embedding file for ``clip_id``."""
    if shards is None:
        shards = completed_shards(layout, source_id)
    return [
        s
        for s in shards
        if not existing_embeddings_ok(layout.embedding_shard(clip_id, source_id, s), clip_id)
    ]


def clip_identity_path(layout: StorageLayout, clip_id: str) -> str:
    """The record of what a ``clip_id`` is (model, weights), written with its first embeddings."""
    return f"{layout.clip_dir(clip_id)}/identity.json"


def embedded_source(layout: StorageLayout, source_id: str, clip_id: str) -> EmbedResult | None:
    """The result of embedding ``source_id`` with ``clip_id`` if nothing is left to do, else None."""
    if not exists(clip_identity_path(layout, clip_id)):
        return None
    shards = completed_shards(layout, source_id)
    if pending_shards(layout, clip_id, source_id, shards):
        return None
    return EmbedResult(0, len(shards), clip_id)
