"""Whole-split readers for evaluation: embeddings, image tars joined with embeddings by key.

Training never loads a split whole: it streams (:mod:`unclip.datasets.stream`). These readers
serve the hold-out evaluations and tools, where the split is small.

Keys returned here are ``"{source}/{key}"``: img2dataset keys are unique within a source only.
The hold-out split hashes that global key, so it is the same on every machine and every run.
Every embedding file is checked against the manifest (sha256, CLIP identity, dimension, schema)
before it is used: a file from another CLIP or a changed file is an error, never silently mixed
in. A manifest assembled with a CLIP-score filter (``clip_score_min``) serves only the rows
passing it; readers apply it per row and check the count against the manifest.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from PIL import Image

from .embedding_file import (
    CLIP_ID_KEY,
    DIM_KEY,
    check_embedding_metadata,
    check_embedding_schema,
    vectors_to_numpy,
)
from .served_rows import kept_mask, require_images
from .shards import ShardReadStats, completed_shards, iter_shard
from .storage import StorageLayout, read_json

__all__ = [
    "CLIP_ID_KEY",
    "DIM_KEY",
    "EmbeddingArrays",
    "ImagePairs",
    "check_embedding_metadata",
    "vectors_to_numpy",
    "in_holdout",
    "kept_mask",
    "load_embedding_stats",
    "load_embeddings",
    "load_image_pairs",
    "load_images_captions",
    "load_manifest",
    "holdout_captions",
    "read_embedding_table",
    "require_images",
]

log = logging.getLogger(__name__)

Split = Literal["train", "holdout", "all"]


@dataclass
class EmbeddingArrays:
    keys: list[str]
    captions: list[str]
    image: np.ndarray  # float32 [N, D]
    text: np.ndarray  # float32 [N, D]


@dataclass
class ImagePairs:
    keys: list[str]
    captions: list[str]
    images: np.ndarray  # uint8 [N, H, W, 3]
    image_emb: np.ndarray | None  # float32 [N, D]
    text_emb: np.ndarray | None  # float32 [N, D]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count


def in_holdout(key: str, fraction: float) -> bool:
    """Whether ``key`` is in the hold-out split: a hash of the key, deterministic everywhere."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction


def _keep(key: str, split: Split, fraction: float) -> bool:
    if split == "all":
        return True
    if split not in ("train", "holdout"):
        raise ValueError(f"split must be 'train', 'holdout' or 'all', not {split!r}")
    return in_holdout(key, fraction) == (split == "holdout")


def load_manifest(layout: StorageLayout, version: str) -> dict[str, Any]:
    """The manifest of dataset ``version``."""
    path = layout.manifest(version)
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"dataset version {version!r}: no manifest at {path}")
    return read_json(path)


def load_embedding_stats(layout: StorageLayout, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """image_mean, image_std, text_mean, text_std (float32 [D]) of the manifest's embeddings."""
    path = layout.embedding_stats(manifest["version"])
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"dataset version {manifest['version']!r}: no stats at {path}")
    with fs.open(p, "rb") as f:
        data = np.load(io.BytesIO(f.read()))
        return {k: data[k].astype(np.float32) for k in data.files}


def read_embedding_table(
    layout: StorageLayout,
    entry: dict[str, Any],
    clip_id: str | None = None,
    embedding_dim: int | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """One manifest entry's embedding Parquet, checked against its sha256 and the CLIP identity."""
    path = layout.join(entry["embeddings"])
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise FileNotFoundError(
            f"embeddings of {entry['source']}/{entry['shard']}: {path} is missing"
        )
    with fs.open(p, "rb") as f:
        data = f.read()
    if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"{path}: sha256 differs from the manifest (file changed or truncated)")
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        check_embedding_schema(path, pf.schema_arrow, clip_id, embedding_dim)
        table = pf.read(columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: unreadable Parquet ({e})") from e
    return table


def served_tables(
    layout: StorageLayout, manifest: dict[str, Any], columns: list[str]
) -> Iterator[tuple[dict[str, Any], pa.Table, np.ndarray]]:
    """Each manifest shard's embedding table (``columns``) and the mask of the rows it serves
    (the recipe's and semantic dedup's removals left out)."""
    d = int(manifest["embedding_dim"])
    for entry in manifest["shards"]:
        t = read_embedding_table(layout, entry, manifest["clip_id"], d, columns=columns)
        yield entry, t, kept_mask(layout, t, manifest, entry)


def holdout_captions(
    layout: StorageLayout, manifest: dict[str, Any], holdout_fraction: float, n: int
) -> list[str]:
    """The first ``n`` distinct captions of the hold-out split, in manifest order.

    Reads only the key and caption columns, shard by shard, and stops once it has ``n``.
    """
    d = int(manifest["embedding_dim"])
    out: list[str] = []
    for entry in manifest["shards"]:
        t = read_embedding_table(
            layout, entry, manifest["clip_id"], d, columns=["key", "caption", "clip_score"]
        )
        keep = kept_mask(layout, t, manifest, entry)
        for key, caption, kept in zip(
            t.column("key").to_pylist(), t.column("caption").to_pylist(), keep, strict=True
        ):
            if (
                kept
                and caption not in out
                and in_holdout(f"{entry['source']}/{key}", holdout_fraction)
            ):
                out.append(caption)
                if len(out) == n:
                    return out
    if not out:
        raise ValueError(
            f"dataset version {manifest['version']}: the hold-out split has no captions "
            "(too few pairs?); set evaluate.captions"
        )
    return out


def load_embeddings(
    layout: StorageLayout,
    manifest: dict[str, Any],
    split: Split,
    holdout_fraction: float,
    only: Collection[str] | None = None,
) -> EmbeddingArrays:
    """Image and text embeddings of the manifest's shards (one split), as float32 arrays.

    With ``only``, just those global keys are kept in memory (a worker's share).
    """
    columns = ["key", "caption", "image_embedding", "text_embedding", "clip_score"]
    rows: list[tuple[list[str], list[str], np.ndarray, np.ndarray]] = []
    for entry, t, mask in served_tables(layout, manifest, columns):
        gkeys = [f"{entry['source']}/{k}" for k in t.column("key").to_pylist()]
        mask &= np.array([_keep(k, split, holdout_fraction) for k in gkeys], dtype=bool)
        if only is not None:
            mask &= np.array([k in only for k in gkeys], dtype=bool)
        if mask.any():
            picked = np.flatnonzero(mask)
            rows.append(
                (
                    [gkeys[i] for i in picked],
                    t.column("caption").take(picked).to_pylist(),
                    vectors_to_numpy(t.column("image_embedding"))[mask],
                    vectors_to_numpy(t.column("text_embedding"))[mask],
                )
            )
    empty = np.zeros((0, int(manifest["embedding_dim"])), np.float32)
    return EmbeddingArrays(
        keys=[k for r in rows for k in r[0]],
        captions=[c for r in rows for c in r[1]],
        image=np.concatenate([r[2] for r in rows]) if rows else empty,
        text=np.concatenate([r[3] for r in rows]) if rows else empty,
    )


def _to_array(image: Image.Image, image_size: int | None) -> np.ndarray:
    if image_size is not None and image.size != (image_size, image_size):
        w, h = image.size
        s = min(w, h)
        if w != h:  # center crop to square first
            left, top = (w - s) // 2, (h - s) // 2
            image = image.crop((left, top, left + s, top + s))
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _stack(arrays: list[np.ndarray], keys: list[str]) -> np.ndarray:
    if not arrays:
        return np.zeros((0, 0, 0, 3), np.uint8)
    shape = arrays[0].shape
    for a, k in zip(arrays, keys, strict=True):
        if a.shape != shape:
            raise ValueError(
                f"image {k} is {a.shape[1]}x{a.shape[0]}, others are {shape[1]}x{shape[0]}; "
                "pass image_size to resize"
            )
    return np.stack(arrays)


def _iter_samples(
    layout: StorageLayout, shards: Iterable[tuple[str, int]], stats: ShardReadStats
) -> Iterator[tuple[str, int, Any]]:
    for source, shard in shards:
        for s in iter_shard(layout.image_shard(source, shard), stats):
            yield source, shard, s


def _iter_pairs(
    layout: StorageLayout,
    manifest: dict[str, Any],
    split: Split,
    holdout_fraction: float,
    stats: ShardReadStats,
    skipped: dict[str, int],
) -> Iterator[tuple[str, Any, np.ndarray, np.ndarray]]:
    """``(global key, tar sample, image emb, text emb)`` of every served, joinable sample."""
    require_images(manifest)
    columns = ["key", "image_embedding", "text_embedding", "clip_score"]
    for entry, t, keep in served_tables(layout, manifest, columns):
        all_keys = t.column("key").to_pylist()
        index = {k: i for i, k in enumerate(all_keys) if keep[i]}
        left_out = {k for i, k in enumerate(all_keys) if not keep[i]}
        ie = vectors_to_numpy(t.column("image_embedding"))
        te = vectors_to_numpy(t.column("text_embedding"))
        source = entry["source"]
        for s in iter_shard(layout.join(entry["images"]), stats):
            gkey = f"{source}/{s.key}"
            if not _keep(gkey, split, holdout_fraction):
                continue
            i = index.get(s.key)
            if i is None:
                # left out by the manifest's CLIP-score filter: expected, not a skip
                name = "clip_score_filtered" if s.key in left_out else "not_in_embeddings"
                skipped[name] = skipped.get(name, 0) + 1
                continue
            yield gkey, s, ie[i], te[i]


def load_image_pairs(
    layout: StorageLayout,
    manifest: dict[str, Any],
    split: Split,
    holdout_fraction: float,
    image_size: int | None = None,
    only: Collection[str] | None = None,
) -> ImagePairs:
    """Images of the manifest's tars joined with their embeddings by key (one split).

    With ``only``, just those global keys are decoded into memory (a worker's share).
    """
    d = int(manifest["embedding_dim"])
    keys: list[str] = []
    captions: list[str] = []
    images: list[np.ndarray] = []
    img_emb: list[np.ndarray] = []
    txt_emb: list[np.ndarray] = []
    skipped = {"not_in_embeddings": 0, "corrupt": 0, "truncated_tar": 0}
    stats = ShardReadStats()
    for gkey, s, ie, te in _iter_pairs(layout, manifest, split, holdout_fraction, stats, skipped):
        if only is not None and gkey not in only:
            continue
        keys.append(gkey)
        captions.append(s.caption)
        images.append(_to_array(s.image, image_size))
        img_emb.append(ie)
        txt_emb.append(te)
    filtered = skipped.pop("clip_score_filtered", 0)
    skipped["corrupt"], skipped["truncated_tar"] = stats.corrupt, stats.truncated
    if any(skipped.values()):
        log.warning("load_image_pairs skipped %s (first errors: %s)", skipped, stats.errors[:3])
    if filtered:
        skipped["clip_score_filtered"] = filtered
    return ImagePairs(
        keys=keys,
        captions=captions,
        images=_stack(images, keys),
        image_emb=np.stack(img_emb) if img_emb else np.zeros((0, d), np.float32),
        text_emb=np.stack(txt_emb) if txt_emb else np.zeros((0, d), np.float32),
        skipped=skipped,
    )


def load_images_captions(
    layout: StorageLayout,
    source_ids: list[str],
    split: Split,
    holdout_fraction: float,
    image_size: int | None = None,
    removed: Collection[str] = (),
) -> ImagePairs:
    """Images and captions of every committed shard of ``source_ids`` (before any embeddings
    exist), less the global keys in ``removed`` (semantic dedup's removal lists)."""
    removed = set(removed)
    keys: list[str] = []
    captions: list[str] = []
    images: list[np.ndarray] = []
    stats = ShardReadStats()
    shards = [(src, sh) for src in source_ids for sh in completed_shards(layout, src)]
    for source, _, s in _iter_samples(layout, shards, stats):
        gkey = f"{source}/{s.key}"
        if not _keep(gkey, split, holdout_fraction) or gkey in removed:
            continue
        keys.append(gkey)
        captions.append(s.caption)
        images.append(_to_array(s.image, image_size))
    skipped = {"corrupt": stats.corrupt, "truncated_tar": stats.truncated}
    if any(skipped.values()):
        log.warning("load_images_captions skipped %s (first errors: %s)", skipped, stats.errors[:3])
    return ImagePairs(
        keys=keys,
        captions=captions,
        images=_stack(images, keys),
        image_emb=None,
        text_emb=None,
        skipped=skipped,
    )
