"""The shard sources training streams from: embedding Parquet, and image tars joined with it.

Every source serves one split (``train`` / ``holdout`` / ``all``, by the hash of each global
key) of a set of shards. Its per-shard counts are computed once, on the driver, from the
shards' key columns only (:func:`manifest_counts` caches them beside the manifest), so a rank
never scans the data set to learn its share. A shard's *index* is the ordered list of its
served keys: the rows of its embedding Parquet that pass the split and the manifest's CLIP-score
filter, or — for the bootstrap CLIP, before any embedding exists — the ``success`` rows of the
shard's img2dataset Parquet. Stream positions are positions in that index.

On the rank, a shard is read whole once (every embedding file checked against the manifest:
sha256, CLIP identity, dimension, row count) and kept until the stream moves to another shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from PIL import Image

from .embedding_file import vectors_to_numpy
from .readers import Split, _keep, _to_array, read_embedding_table
from .served_rows import kept_mask, require_images
from .shards import IMAGE_EXTS, ShardReadStats, completed_shards, iter_shard_members
from .storage import StorageLayout, atomic_write, exists, read_json
from .stream import Columns, Missing, ShardSource, StreamShard, StreamStats

log = logging.getLogger(__name__)


def _split_keys(source: str, keys: list[str], split: Split, fraction: float) -> np.ndarray:
    return np.array([_keep(f"{source}/{k}", split, fraction) for k in keys], dtype=bool)


def _counts_path(layout: StorageLayout, version: str, split: Split, fraction: float) -> str:
    return layout.join("manifests", f"{version}.counts-{split}-{fraction!r}.json")


def manifest_counts(
    layout: StorageLayout, manifest: dict[str, Any], split: Split, fraction: float
) -> list[int]:
    """Samples of each manifest shard in ``split``: from the key columns, once per version."""
    path = _counts_path(layout, manifest["version"], split, fraction)
    if exists(path):
        counts = read_json(path)["counts"]
        if len(counts) == len(manifest["shards"]):
            return [int(c) for c in counts]
    counts = []
    for entry in manifest["shards"]:
        table = _read_columns(layout.join(entry["embeddings"]), ["key", "clip_score"])
        keep = _split_keys(entry["source"], table.column("key").to_pylist(), split, fraction)
        keep &= kept_mask(layout, table, manifest, entry)
        counts.append(int(keep.sum()))
    with atomic_write(path) as f:
        f.write(json.dumps({"counts": counts}).encode())
    return counts


def _read_columns(path: str, columns: list[str]) -> Any:
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"{path} is missing (a shard the stream lists)")
    with fs.open(p, "rb") as f:
        return pq.read_table(f, columns=columns)


@dataclass
class _Loaded:
    """The shard a source read last: its index and what the rank needs of it."""

    shard: int
    keys: list[str]
    columns: dict[str, Any]  # per index position: captions, embeddings
    members: dict[str, dict[str, bytes]] | None = None  # tar members by key (image sources)


class _OneShard:
    """A source's cache of the shard it read last (one shard, never more; workers start empty)."""

    _last: _Loaded | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_last": None}  # workers get paths, never a loaded shard

    def _load(self, shard: int, stats: StreamStats) -> _Loaded:
        raise NotImplementedError

    def _shard(self, shard: int, stats: StreamStats) -> _Loaded:
        if self._last is None or self._last.shard != shard:
            self._last = None  # free the previous shard before reading the next
            self._last = self._load(shard, stats)
        return self._last


@dataclass
class EmbeddingSource(_OneShard, ShardSource):
    """Embedding pairs of a dataset version: what the prior trains on."""

    layout: StorageLayout
    manifest: dict[str, Any]
    split: Split
    holdout_fraction: float
    shards: list[StreamShard] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.shards:
            counts = manifest_counts(self.layout, self.manifest, self.split, self.holdout_fraction)
            self.shards = [
                StreamShard(f"{e['source']}/{int(e['shard']):05d}", c)
                for e, c in zip(self.manifest["shards"], counts, strict=True)
            ]

    def identity(self) -> dict[str, Any]:
        return {
            **super().identity(),
            "version": self.manifest["version"],
            "split": self.split,
            "holdout_fraction": self.holdout_fraction,
        }

    def _load_embeddings(self, shard: int, stats: StreamStats) -> _Loaded:
        """The shard's embedding file, checked, cut to this stream's index."""
        entry = self.manifest["shards"][shard]
        path = self.layout.join(entry["embeddings"])
        table = read_embedding_table(
            self.layout,
            entry,
            self.manifest["clip_id"],
            int(self.manifest["embedding_dim"]),
            columns=["key", "caption", "image_embedding", "text_embedding", "clip_score"],
        )
        stats.bytes_read += _size(path)
        stats.shards_opened += 1
        keys = table.column("key").to_pylist()
        keep = kept_mask(self.layout, table, self.manifest, entry)
        keep &= _split_keys(entry["source"], keys, self.split, self.holdout_fraction)
        want = self.shards[shard].count
        if int(keep.sum()) != want:
            raise ValueError(
                f"{path}: {int(keep.sum())} rows in split {self.split!r}, the manifest's counts "
                f"say {want}: the file is not the one the manifest was assembled from"
            )
        captions = table.column("caption").to_pylist()
        return _Loaded(
            shard,
            [k for k, m in zip(keys, keep, strict=True) if m],
            {
                "caption": [c for c, m in zip(captions, keep, strict=True) if m],
                "image_embedding": vectors_to_numpy(table.column("image_embedding"))[keep],
                "text_embedding": vectors_to_numpy(table.column("text_embedding"))[keep],
            },
        )

    def _load(self, shard: int, stats: StreamStats) -> _Loaded:
        return self._load_embeddings(shard, stats)

    def read(self, shard: int, start: int, stop: int, stats: StreamStats) -> list[Any]:
        got = self._shard(shard, stats)
        c = got.columns
        return [
            (got.keys[i], c["caption"][i], c["image_embedding"][i], c["text_embedding"][i])
            for i in range(start, stop)
        ]

    def collate(self, samples: list[Any]) -> Columns:
        return {
            "key": [s[0] for s in samples],
            "caption": [s[1] for s in samples],
            "image_embedding": np.stack([s[2] for s in samples]),
            "text_embedding": np.stack([s[3] for s in samples]),
        }


def _size(path: str) -> int:
    fs, p = url_to_fs(path)
    try:
        return int(fs.size(p))
    except (OSError, TypeError, ValueError):
        return 0


def _read_members(path: str, keys: set[str], stats: StreamStats) -> dict[str, dict[str, bytes]]:
    """The members of ``keys`` in one tar (a truncated tar gives fewer, counted)."""
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"{path} is missing (listed in the stream's shards)")
    stats.bytes_read += _size(path)
    stats.shards_opened += 1
    tar_stats = ShardReadStats()
    members = {k: m for k, m in iter_shard_members(path, tar_stats) if k in keys}
    for message in tar_stats.errors:
        log.warning("%s", message)
    return members


def decode_image(members: dict[str, bytes], image_size: int | None) -> np.ndarray:
    """The sample's image as uint8 [S, S, 3] (centre crop and bicubic resize to ``image_size``)."""
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        raise ValueError("no image member")
    with Image.open(io.BytesIO(members[ext])) as im:
        im.load()
        return _to_array(im.convert("RGB"), image_size)


@dataclass
class ImagePairSource(EmbeddingSource):
    """Images of a dataset version's tars joined with their embeddings by key (decoder, upsampler)."""

    image_size: int | None = None
    with_embeddings: bool = True

    def __post_init__(self) -> None:
        require_images(self.manifest)
        super().__post_init__()

    def _load(self, shard: int, stats: StreamStats) -> _Loaded:
        got = self._load_embeddings(shard, stats)
        path = self.layout.join(self.manifest["shards"][shard]["images"])
        got.members = _read_members(path, set(got.keys), stats)
        return got

    def read(self, shard: int, start: int, stop: int, stats: StreamStats) -> list[Any]:
        got = self._shard(shard, stats)
        assert got.members is not None
        c, out = got.columns, []
        for i in range(start, stop):
            members = got.members.get(got.keys[i])
            if members is None:
                name = self.shards[shard].name
                out.append(Missing(f"{name}: sample {got.keys[i]} is missing from the tar"))
                continue
            emb = (c["image_embedding"][i], c["text_embedding"][i]) if self.with_embeddings else ()
            out.append((got.keys[i], c["caption"][i], members, *emb))
        return out

    def decode(self, raw: Any) -> Any:
        return (raw[0], raw[1], decode_image(raw[2], self.image_size), *raw[3:])

    def collate(self, samples: list[Any]) -> Columns:
        out: Columns = {
            "key": [s[0] for s in samples],
            "caption": [s[1] for s in samples],
            "image": np.stack([s[2] for s in samples]),
        }
        if self.with_embeddings:
            out["image_embedding"] = np.stack([s[3] for s in samples])
            out["text_embedding"] = np.stack([s[4] for s in samples])
        return out


@dataclass
class IngestedImageSource(_OneShard, ShardSource):
    """Images and captions of sources' committed shards, before any embedding: the bootstrap CLIP.

    A shard's index is the ``success`` rows of its img2dataset Parquet (the tar's samples),
    less ``removed`` (global ``source/key`` names: semantic dedup's removal lists).
    """

    layout: StorageLayout
    source_ids: list[str]
    split: Split
    holdout_fraction: float
    image_size: int | None = None
    shards: list[StreamShard] = field(default_factory=list)
    paths: list[tuple[str, int]] = field(default_factory=list)  # (source, shard) per shard
    removed: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.shards:
            for source in sorted(set(self.source_ids)):
                for shard in completed_shards(self.layout, source):
                    keys = self._index(source, shard)
                    self.paths.append((source, shard))
                    self.shards.append(StreamShard(f"{source}/{shard:05d}", len(keys)))

    def identity(self) -> dict[str, Any]:
        digest = hashlib.sha256(repr(self.paths).encode())
        if self.removed:
            digest.update(repr(sorted(self.removed)).encode())
        return {**super().identity(), "split": self.split, "paths": digest.hexdigest()[:16]}

    def _index(self, source: str, shard: int) -> list[str]:
        tar = self.layout.image_shard(source, shard)
        table = _read_columns(tar[: -len(".tar")] + ".parquet", ["key", "status"])
        keys = [
            k
            for k, s in zip(
                table.column("key").to_pylist(), table.column("status").to_pylist(), strict=True
            )
            if s == "success" and f"{source}/{k}" not in self.removed
        ]
        keep = _split_keys(source, keys, self.split, self.holdout_fraction)
        return [k for k, m in zip(keys, keep, strict=True) if m]

    def _load(self, shard: int, stats: StreamStats) -> _Loaded:
        source, number = self.paths[shard]
        keys = self._index(source, number)
        if len(keys) != self.shards[shard].count:
            raise ValueError(
                f"{self.shards[shard].name}: {len(keys)} samples now, "
                f"{self.shards[shard].count} when the run was planned"
            )
        members = _read_members(self.layout.image_shard(source, number), set(keys), stats)
        return _Loaded(shard, keys, {}, members)

    def read(self, shard: int, start: int, stop: int, stats: StreamStats) -> list[Any]:
        got = self._shard(shard, stats)
        assert got.members is not None
        out: list[Any] = []
        for key in got.keys[start:stop]:
            members = got.members.get(key)
            if members is None:
                out.append(Missing(f"{self.shards[shard].name}: sample {key} missing from the tar"))
            else:
                out.append((key, members))
        return out

    def decode(self, raw: Any) -> Any:
        key, members = raw
        return key, members.get("txt", b"").decode("utf-8"), decode_image(members, self.image_size)

    def collate(self, samples: list[Any]) -> Columns:
        return {
            "key": [s[0] for s in samples],
            "caption": [s[1] for s in samples],
            "image": np.stack([s[2] for s in samples]),
        }
