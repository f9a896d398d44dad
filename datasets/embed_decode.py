"""Embed's decode stage: a shard's tar read, matched with its metadata, preprocessed and
tokenized in chunks, with what was skipped counted; as column batches for the Ray pipeline."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image

from .clip_preprocess import FastPreprocess, chunk_pixels, tokenize_captions
from .shards import ShardReadStats, iter_shard
from .storage import StorageLayout, exists, read_parquet

if TYPE_CHECKING:
    from .clip import ClipBundle

# What decoding a shard counts; the end row of a shard carries them.
COUNT_KEYS = ("samples", "corrupt", "truncated_tar", "not_in_metadata")


def read_shard_metadata(layout: StorageLayout, source: str, shard: int) -> pa.Table | None:
    """img2dataset's per-row Parquet of the shard (None if absent)."""
    path = layout.image_shard_parquet(source, shard)
    return read_parquet(path) if exists(path) else None


@dataclass
class DecodedChunk:
    """Up to ``chunk_size`` decoded samples of one shard, in tar order."""

    index: np.ndarray  # int64 [n]: the samples' positions among the shard's kept samples
    keys: list[str]
    captions: list[str]
    meta_json: list[str]  # the tar's JSON, only when the shard has no metadata Parquet
    pixels: np.ndarray  # float32 [n, 3, S, S], C-contiguous
    tokens: np.ndarray  # [n, L]


@dataclass(frozen=True)
class DecodeSpec:
    """How a shard's samples become model inputs: the CLIP's transform and tokenizer, samples
    per chunk, and whether a chunk tokenizes each distinct caption once."""

    preprocess: Callable[[Image.Image], Any]
    tokenizer: Callable[[list[str]], Any]
    chunk_size: int
    dedup_captions: bool = True

    @classmethod
    def of(cls, bundle: ClipBundle, chunk_size: int, dedup_captions: bool = True) -> DecodeSpec:
        """The spec of a loaded CLIP's own preprocessing and tokenizer."""
        return cls(bundle.preprocess, bundle.tokenizer, chunk_size, dedup_captions)


@dataclass
class ShardTally:
    """What decoding a shard counted, filled in as its chunks are read."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))
    errors: list[str] = field(default_factory=list)


def decode_chunks(
    layout: StorageLayout, source: str, shard: int, spec: DecodeSpec, tally: ShardTally
) -> Iterator[DecodedChunk]:
    """Decoded, preprocessed, tokenized samples of one tar in chunks; ``tally`` gets the counts.

    Corrupt members and a truncated tar are counted (:class:`ShardReadStats`), as are keys in the
    tar but not in the shard's metadata Parquet (they are skipped: their URL and metadata are
    unknown). ``meta_json`` carries the tar's JSON only when the shard has no metadata Parquet.
    """
    meta_table = read_shard_metadata(layout, source, shard)
    meta_keys = set(meta_table.column("key").to_pylist()) if meta_table is not None else None
    preprocess = spec.preprocess
    fast = FastPreprocess.of(preprocess)
    stats = ShardReadStats()
    not_in_meta = samples = 0
    items: list[tuple[int, str, str, str, np.ndarray]] = []

    def flush() -> DecodedChunk:
        captions = [it[2] for it in items]
        chunk = DecodedChunk(
            index=np.array([it[0] for it in items], np.int64),
            keys=[it[1] for it in items],
            captions=captions,
            meta_json=[it[3] for it in items],
            pixels=chunk_pixels([it[4] for it in items], fast),
            tokens=tokenize_captions(spec.tokenizer, captions, spec.dedup_captions),
        )
        items.clear()
        return chunk

    for s in iter_shard(layout.image_shard(source, shard), stats):
        if meta_keys is not None and s.key not in meta_keys:
            not_in_meta += 1
            continue
        try:
            if fast is not None and fast.applies(s.image):
                pixels = np.asarray(s.image, dtype=np.uint8)  # normalized per chunk in flush
            else:
                pixels = np.asarray(preprocess(s.image))
        except Exception as e:  # a bad sample is data, not a crash
            stats.add_error(f"{layout.image_shard(source, shard)}: {s.key}: preprocess: {e}")
            continue
        meta_json = "" if meta_table is not None else json.dumps(s.meta, default=str)
        items.append((samples, s.key, s.caption, meta_json, pixels))
        samples += 1
        if len(items) >= spec.chunk_size:
            yield flush()
    if items:
        yield flush()
    tally.counts = {
        "samples": samples,
        "corrupt": stats.corrupt,
        "truncated_tar": stats.truncated,
        "not_in_metadata": not_in_meta,
    }
    tally.errors = stats.errors[:5]


def sample_rows(shard: int, chunk: DecodedChunk) -> dict[str, np.ndarray]:
    """The columns every row carries, for a chunk's samples."""
    n = len(chunk.keys)
    out = {
        "shard": np.full(n, shard, np.int64),
        "index": chunk.index,
        "key": np.array(chunk.keys, dtype=object),
        "caption": np.array(chunk.captions, dtype=object),
        "meta_json": np.array(chunk.meta_json, dtype=object),
        "end": np.zeros(n, bool),
        "errors": np.array(["[]"] * n, dtype=object),
    }
    for k in COUNT_KEYS:
        out[k] = np.zeros(n, np.int64)
    return out


def end_row(shard: int, tally: ShardTally) -> dict[str, np.ndarray]:
    """The shard's one end row: its counts and first errors (no sample)."""
    out = {
        "shard": np.full(1, shard, np.int64),
        "index": np.full(1, -1, np.int64),
        "key": np.array([""], dtype=object),
        "caption": np.array([""], dtype=object),
        "meta_json": np.array([""], dtype=object),
        "end": np.ones(1, bool),
        "errors": np.array([json.dumps(tally.errors)], dtype=object),
    }
    for k in COUNT_KEYS:
        out[k] = np.full(1, tally.counts.get(k, 0), np.int64)
    return out


def decode_shard(
    layout: StorageLayout, source: str, shard: int, spec: DecodeSpec
) -> Iterator[dict[str, np.ndarray]]:
    """The split pipeline's decode task: :func:`decode_chunks` as column batches with
    ``pixels`` and ``tokens``, then one end-of-shard row carrying the shard's counts."""
    tally = ShardTally()
    shapes: tuple[np.ndarray, np.ndarray] | None = None
    for chunk in decode_chunks(layout, source, shard, spec, tally):
        rows = sample_rows(shard, chunk)
        rows["pixels"], rows["tokens"] = chunk.pixels, chunk.tokens
        shapes = (chunk.pixels[0], chunk.tokens[0])
        yield rows
    if shapes is None:  # no sample: the end row still needs pixels / tokens of the right shape
        shapes = (
            np.asarray(spec.preprocess(Image.new("RGB", (8, 8))), np.float32),
            np.asarray(spec.tokenizer([""]))[0],
        )
    end = end_row(shard, tally)
    end["pixels"] = np.zeros((1, *shapes[0].shape), np.float32)
    end["tokens"] = np.zeros((1, *shapes[1].shape), shapes[1].dtype)
    yield end
