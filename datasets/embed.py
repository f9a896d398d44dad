"""Embed: CLIP over image shards into one Parquet file per shard, only where none exists yet.

Three stages, streaming on Ray Data (:func:`embed_source`):

1. **decode** — one Ray Data task per pending shard (:func:`decode_chunks`): read the tar, drop
   keys missing from the shard's metadata, decode, preprocess (batched table look-up,
   bit-identical to open_clip's transform) and tokenize, in chunks of ``batch_size`` samples,
   counting what was skipped (samples, corrupt, truncated, ...);
2. **encode** — ``encode_image`` + ``encode_text`` per chunk (:func:`encode_arrays`; with
   ``dedup_captions`` each distinct caption of a chunk is encoded once). Where it runs is
   ``embed.pipeline``:

   - *fused* (the CPU default): in the decode task itself, with the worker's cached CLIP
     (:func:`cached_clip`; Ray reuses its workers, so the CLIP is loaded once per process).
     No pixels cross the object store, every CPU both decodes and encodes on its own torch
     thread, and a single Ray Data operator has nothing to wait for;
   - *split* (GPU, or chosen on CPU): decode tasks yield column batches with pixels and tokens
     plus an end-of-shard row (:func:`decode_shard`) to a pool of encoders — on GPU an actor
     pool (:class:`ClipEncoder`, one model resident per GPU), on CPU tasks in Ray's reused
     workers with the cached CLIP;
3. **write** — the driver gathers rows per shard and, once a shard's end row and all its
   samples are in, writes ``embeddings/{clip_id}/{source}/{shard}.parquet`` atomically
   (:func:`write_shard`), so a killed run keeps every shard it finished.

:func:`embed_shard` runs the same functions in one process. The file format is
:mod:`.embedding_file`'s; an existing file is trusted only if its footer reads back with this
CLIP's id, so a file truncated by a killed writer elsewhere is embedded again.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from fsspec.core import url_to_fs
from PIL import Image

from .clip import ClipBundle, load_clip
from .config import ClipConfig, EmbedConfig
from .embedding_file import (
    PIPELINE_VERSION,
    check_embedding_metadata,
    file_metadata,
    fixed_list,
    write_embedding_table,
)
from .ingest import shard_parquet_path
from .ray_runtime import ensure_started
from .shards import ShardReadStats, completed_shards, iter_shard
from .storage import StorageLayout, atomic_write, exists, write_json

__all__ = ["PIPELINE_VERSION", "EmbedResult", "embed_shard", "embed_source", "pending_shards"]

log = logging.getLogger(__name__)

# img2dataset's per-row bookkeeping: not carried into the embedding file.
_DROP_META = {"key", "caption", "url", "status", "error_message"}
_OURS = {"key", "caption", "url", "image_embedding", "text_embedding", "clip_score"}
COUNT_KEYS = ("samples", "corrupt", "truncated_tar", "not_in_metadata")


@dataclass
class EmbedResult:
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


def pending_shards(layout: StorageLayout, clip_id: str, source_id: str) -> list[int]:
    """Committed image shards of ``source_id`` with no complete embedding file for ``clip_id``."""
    return [
        s
        for s in completed_shards(layout, source_id)
        if not existing_embeddings_ok(layout.embedding_shard(clip_id, source_id, s), clip_id)
    ]


def _shard_metadata(layout: StorageLayout, source: str, shard: int) -> pa.Table | None:
    """img2dataset's per-row Parquet of the shard (None if absent)."""
    path = shard_parquet_path(layout, source, shard)
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        return None
    with fs.open(p, "rb") as f:
        return pq.read_table(f)


# --- stage 1: decode ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FastPreprocess:
    """open_clip's eval transform, batched, for images already at its size (the usual case:
    ingest resizes to the CLIP's size).

    Resize and CenterCrop are the identity on an ``S x S`` RGB image, so what is left is
    ToTensor + Normalize: ``(v / 255 - mean[c]) / std[c]`` in float32 for each uint8 value
    ``v`` of channel ``c``. That is a function of (v, c) alone, so it is tabulated once — 256 x
    3 values computed with the same float32 operations in the same order — and a chunk is
    normalized by table look-up: bit-identical to ``preprocess(image)``, ~4x faster than the
    arithmetic.
    """

    size: int
    mean: np.ndarray  # float32 [3]
    std: np.ndarray  # float32 [3]

    @classmethod
    def of(cls, preprocess: Any) -> FastPreprocess | None:
        """The fast path for ``preprocess``, or None when it is not the standard transform."""
        steps = getattr(preprocess, "transforms", None)
        names = [type(t).__name__ for t in steps or []]
        if names not in (
            ["Resize", "CenterCrop", "MaybeConvertMode", "MaybeToTensor", "Normalize"],
            ["Resize", "CenterCrop", "ToTensor", "Normalize"],
        ):
            return None
        resize, crop, norm = steps[0], steps[1], steps[-1]
        size = resize.size if isinstance(resize.size, int) else None
        if isinstance(resize.size, list | tuple) and len(set(resize.size)) == 1:
            size = int(resize.size[0])
        crop_size = tuple(crop.size) if isinstance(crop.size, list | tuple) else (crop.size,) * 2
        mode = getattr(steps[2], "mode", "RGB")
        if size is None or crop_size != (size, size) or mode not in ("RGB", None):
            return None
        return cls(size, np.asarray(norm.mean, np.float32), np.asarray(norm.std, np.float32))

    @cached_property
    def table(self) -> np.ndarray:
        """float32 [3, 256]: channel c, value v → ToTensor + Normalize of v."""
        x = np.arange(256, dtype=np.uint8).astype(np.float32) / np.float32(255)
        return np.ascontiguousarray(((x[:, None] - self.mean) / self.std).T)

    def applies(self, image: Image.Image) -> bool:
        """Whether ``image`` may skip the per-image transform (RGB, already ``S x S``)."""
        return image.mode == "RGB" and image.size == (self.size, self.size)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] → normalized float32 [N, 3, S, S], as ToTensor + Normalize."""
        n, h, w, _ = images.shape
        out = np.empty((n, 3, h, w), np.float32)
        for c in range(3):
            np.take(self.table[c], images[..., c], out=out[:, c])
        return out


def _pixels(items: list[np.ndarray], fast: FastPreprocess | None) -> np.ndarray:
    """float32 [N, 3, S, S] pixels of a chunk (C-contiguous): uint8 HWC items (fast path)
    normalized in one batch, the others as their per-image transform gave them."""
    raw = [i for i, p in enumerate(items) if p.dtype == np.uint8]
    if raw and len(raw) == len(items):
        assert fast is not None
        return fast(np.stack(items))
    done = [p for p in items if p.dtype != np.uint8]
    out = np.empty((len(items), *done[0].shape), np.float32)
    if raw:
        assert fast is not None
        out[raw] = fast(np.stack([items[i] for i in raw]))
    for i, p in enumerate(items):
        if p.dtype != np.uint8:
            out[i] = p
    return out


def _tokens(tokenizer: Callable[[list[str]], Any], captions: list[str], dedup: bool) -> np.ndarray:
    """Token ids [N, L] of ``captions``; with ``dedup`` each distinct caption is tokenized once
    (the tokenizer maps each caption on its own, so the ids are the same)."""
    distinct = list(dict.fromkeys(captions)) if dedup else captions
    tokens = np.asarray(tokenizer(distinct))
    if len(distinct) == len(captions):
        return tokens
    row = {c: i for i, c in enumerate(distinct)}
    return tokens[[row[c] for c in captions]]


@dataclass
class DecodedChunk:
    """Up to ``chunk_size`` decoded samples of one shard, in tar order."""

    index: np.ndarray  # int64 [n]: the samples' positions among the shard's kept samples
    keys: list[str]
    captions: list[str]
    meta_json: list[str]  # the tar's JSON, only when the shard has no metadata Parquet
    pixels: np.ndarray  # float32 [n, 3, S, S], C-contiguous
    tokens: np.ndarray  # [n, L]


@dataclass
class ShardTally:
    """What decoding a shard counted, filled in as its chunks are read."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))
    errors: list[str] = field(default_factory=list)


def decode_chunks(
    layout: StorageLayout,
    source: str,
    shard: int,
    preprocess: Callable[[Image.Image], Any],
    tokenizer: Callable[[list[str]], Any],
    chunk_size: int,
    tally: ShardTally,
    dedup_captions: bool = True,
) -> Iterator[DecodedChunk]:
    """Decoded, preprocessed, tokenized samples of one tar in chunks; ``tally`` gets the counts.

    Corrupt members and a truncated tar are counted (:class:`ShardReadStats`), as are keys in the
    tar but not in the shard's metadata Parquet (they are skipped: their URL and metadata are
    unknown). ``meta_json`` carries the tar's JSON only when the shard has no metadata Parquet.
    """
    meta_table = _shard_metadata(layout, source, shard)
    meta_keys = set(meta_table.column("key").to_pylist()) if meta_table is not None else None
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
            pixels=_pixels([it[4] for it in items], fast),
            tokens=_tokens(tokenizer, captions, dedup_captions),
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
        if len(items) >= chunk_size:
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


def _sample_rows(shard: int, chunk: DecodedChunk) -> dict[str, np.ndarray]:
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


def _end_row(shard: int, tally: ShardTally) -> dict[str, np.ndarray]:
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
    layout: StorageLayout,
    source: str,
    shard: int,
    preprocess: Callable[[Image.Image], Any],
    tokenizer: Callable[[list[str]], Any],
    chunk_size: int,
    dedup_captions: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """The split pipeline's decode task: :func:`decode_chunks` as column batches with
    ``pixels`` and ``tokens``, then one end-of-shard row carrying the shard's counts."""
    tally = ShardTally()
    shapes: tuple[np.ndarray, np.ndarray] | None = None
    for chunk in decode_chunks(
        layout, source, shard, preprocess, tokenizer, chunk_size, tally, dedup_captions
    ):
        rows = _sample_rows(shard, chunk)
        rows["pixels"], rows["tokens"] = chunk.pixels, chunk.tokens
        shapes = (chunk.pixels[0], chunk.tokens[0])
        yield rows
    if shapes is None:  # no sample: the end row still needs pixels / tokens of the right shape
        shapes = (
            np.asarray(preprocess(Image.new("RGB", (8, 8))), np.float32),
            np.asarray(tokenizer([""]))[0],
        )
    end = _end_row(shard, tally)
    end["pixels"] = np.zeros((1, *shapes[0].shape), np.float32)
    end["tokens"] = np.zeros((1, *shapes[1].shape), shapes[1].dtype)
    yield end


# --- stage 2: encode ---------------------------------------------------------------------------


def encode_arrays(
    bundle: ClipBundle, pixels: np.ndarray, tokens: np.ndarray, dedup_captions: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """float32 [N, D] image and text embeddings (L2-normalised) of N preprocessed samples.

    The pixels reach torch without a copy when they are C-contiguous float32 (decode's output
    is); with ``dedup_captions`` each distinct token row is encoded once and shared.
    """
    import torch

    x = np.ascontiguousarray(pixels, dtype=np.float32)
    distinct, inverse = tokens, None
    if dedup_captions and len(tokens) > 1:
        rows, where = np.unique(tokens, axis=0, return_inverse=True)
        if len(rows) < len(tokens):  # else keep the batch as it is (unique() sorts the rows)
            distinct, inverse = rows, where.reshape(-1)
    with torch.inference_mode(), warnings.catch_warnings():
        # a batch read from Ray's object store is read-only; the model only reads it
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        images = torch.from_numpy(x).to(bundle.device)
        ie = bundle.model.encode_image(images, normalize=True).float().cpu().numpy()
        t = torch.from_numpy(np.ascontiguousarray(distinct)).to(bundle.device)
        te = bundle.model.encode_text(t, normalize=True).float().cpu().numpy()
    if inverse is not None:
        te = te[inverse]
    return ie, te


def _with_embeddings(
    rows: dict[str, np.ndarray], ie: np.ndarray, te: np.ndarray
) -> dict[str, np.ndarray]:
    rows["image_embedding"] = ie.astype(np.float16)
    rows["text_embedding"] = te.astype(np.float16)
    rows["clip_score"] = (ie * te).sum(axis=1).astype(np.float32)  # before rounding to float16
    return rows


def encode_batch(
    bundle: ClipBundle, batch: dict[str, np.ndarray], dedup_captions: bool = True
) -> dict[str, np.ndarray]:
    """Image and text embeddings (float16, L2-normalised) and clip_score of a decoded batch."""
    sample = ~batch["end"].astype(bool)
    n, d = len(sample), bundle.embed_dim
    ie = np.zeros((n, d), np.float32)
    te = np.zeros((n, d), np.float32)
    if sample.all():
        ie, te = encode_arrays(bundle, batch["pixels"], batch["tokens"], dedup_captions)
    elif sample.any():
        ie[sample], te[sample] = encode_arrays(
            bundle, batch["pixels"][sample], batch["tokens"][sample], dedup_captions
        )
    out = {k: v for k, v in batch.items() if k not in ("pixels", "tokens")}
    return _with_embeddings(out, ie, te)


def encode_shard(
    layout: StorageLayout,
    bundle: ClipBundle,
    source: str,
    shard: int,
    batch_size: int,
    dedup_captions: bool = True,
) -> dict[str, np.ndarray]:
    """Decode and encode one shard here (the fused pipeline's task): its encoded rows, then
    its end row, as one column batch — no pixels leave this function."""
    tally = ShardTally()
    parts = []
    for chunk in decode_chunks(
        layout,
        source,
        shard,
        bundle.preprocess,
        bundle.tokenizer,
        batch_size,
        tally,
        dedup_captions,
    ):
        ie, te = encode_arrays(bundle, chunk.pixels, chunk.tokens, dedup_captions)
        parts.append(_with_embeddings(_sample_rows(shard, chunk), ie, te))
    d = bundle.embed_dim
    parts.append(
        _with_embeddings(
            _end_row(shard, tally), np.zeros((1, d), np.float32), np.zeros((1, d), np.float32)
        )
    )
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# One CLIP per worker process, kept between encode tasks: Ray reuses its task workers, and the
# decode tasks have already imported torch and open_clip there (to unpickle the transform), so
# a CPU encoder needs neither a process of its own nor a second import of them.
_CACHED: dict[tuple[str, str | None, str, str], ClipBundle] = {}


def cached_clip(
    clip_cfg: ClipConfig, checkpoint: str | None, device: str, clip_id: str
) -> ClipBundle:
    """This process's CLIP for ``clip_id``, loaded on first use; a different id is an error."""
    key = (clip_cfg.model_dump_json(), checkpoint, device, clip_id)
    if key not in _CACHED:
        _CACHED.clear()  # one CLIP per process at a time
        bundle = load_clip(clip_cfg, checkpoint, device=device)
        if bundle.clip_id != clip_id:  # the checkpoint changed since the driver loaded it
            raise RuntimeError(
                f"CLIP {checkpoint}: loaded {bundle.clip_id}, the embed run started with {clip_id}"
            )
        _CACHED[key] = bundle
    return _CACHED[key]


def _encode_udf(
    batch: dict[str, np.ndarray],
    clip_cfg: ClipConfig,
    checkpoint: str | None,
    cfg: EmbedConfig,
    clip_id: str,
) -> dict[str, np.ndarray]:
    import torch

    torch.set_num_threads(cfg.torch_threads or 1)
    bundle = cached_clip(clip_cfg, checkpoint, cfg.device, clip_id)
    return encode_batch(bundle, batch, cfg.dedup_captions)


class ClipEncoder:
    """Ray Data actor (GPU encoders): loads the CLIP once, encodes batches of decoded samples."""

    def __init__(self, clip_cfg: ClipConfig, checkpoint: str | None, cfg: EmbedConfig) -> None:
        import torch

        if cfg.torch_threads is not None:
            torch.set_num_threads(cfg.torch_threads)
        self.bundle = load_clip(clip_cfg, checkpoint, device=cfg.device)
        self.dedup_captions = cfg.dedup_captions

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return encode_batch(self.bundle, batch, self.dedup_captions)


# --- stage 3: write ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FileInfo:
    """What the writer needs to know of the CLIP (not the model itself)."""

    clip_id: str
    embed_dim: int
    identity: dict[str, Any]

    @classmethod
    def of(cls, bundle: ClipBundle) -> FileInfo:
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

    meta_table = _shard_metadata(layout, source, shard)
    if meta_table is not None:
        row_of = {k: i for i, k in enumerate(meta_table.column("key").to_pylist()) if k is not None}
        meta = meta_table.take(pa.array([row_of[k] for k in keys], pa.int64()))
    elif keys:
        meta = pa.Table.from_pylist([json.loads(m) for m in rows["meta_json"]])
    else:
        meta = pa.table({"url": pa.array([], pa.string())})
    if "url" not in meta.column_names:
        meta = meta.append_column("url", pa.nulls(len(keys), pa.string()))
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "caption": pa.array([str(c) for c in rows["caption"]], pa.string()),
            "url": meta.column("url").cast(pa.string()),
            "image_embedding": fixed_list(rows["image_embedding"].reshape(-1, d)),
            "text_embedding": fixed_list(rows["text_embedding"].reshape(-1, d)),
            "clip_score": pa.array(rows["clip_score"], pa.float32()),
        }
    )
    for name in meta.column_names:
        if name not in _DROP_META and name not in _OURS:
            table = table.append_column(name, meta.column(name))
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
    rows = encode_shard(layout, bundle, source, shard, batch_size, dedup_captions)
    return write_shard(layout, FileInfo.of(bundle), source, shard, [rows])


# --- the Ray Data pipeline ---------------------------------------------------------------------


def _decode_udf(
    batch: dict[str, np.ndarray],
    root: str,
    source: str,
    preprocess: Callable[[Image.Image], Any],
    tokenizer: Callable[[list[str]], Any],
    chunk_size: int,
    dedup_captions: bool,
) -> Iterator[dict[str, np.ndarray]]:
    layout = StorageLayout(root)
    for shard in batch["shard"]:
        yield from decode_shard(
            layout, source, int(shard), preprocess, tokenizer, chunk_size, dedup_captions
        )


def _fused_udf(
    batch: dict[str, np.ndarray],
    root: str,
    source: str,
    clip_cfg: ClipConfig,
    checkpoint: str | None,
    cfg: EmbedConfig,
    clip_id: str,
) -> Iterator[dict[str, np.ndarray]]:
    """The fused pipeline's task: decode and encode whole shards with this worker's CLIP."""
    import torch

    torch.set_num_threads(cfg.torch_threads or max(1, round(cfg.decode_cpus)))
    bundle = cached_clip(clip_cfg, checkpoint, "cpu", clip_id)
    layout = StorageLayout(root)
    for shard in batch["shard"]:
        yield encode_shard(layout, bundle, source, int(shard), cfg.batch_size, cfg.dedup_captions)


class _Gather:
    """Driver side of stage 3: rows per shard until the shard is complete, then its file."""

    def __init__(self, layout: StorageLayout, info: FileInfo, source: str) -> None:
        self.layout, self.info, self.source = layout, info, source
        self.parts: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
        self.have: dict[int, int] = defaultdict(int)
        self.expected: dict[int, int] = {}
        self.results: list[dict[str, int]] = []

    def add(self, batch: dict[str, np.ndarray]) -> None:
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
        return sorted(self.parts)


def _pixel_bytes(info: FileInfo) -> int:
    """float32 bytes of one preprocessed image."""
    size = info.identity.get("preprocess_cfg", {}).get("size", 224)
    h, w = (size, size) if isinstance(size, int) else size
    return 3 * int(h) * int(w) * 4


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
    all_shards = completed_shards(layout, source_id)
    pending = pending_shards(layout, clip_id, source_id)
    redone = [
        layout.embedding_shard(clip_id, source_id, s)
        for s in pending
        if exists(layout.embedding_shard(clip_id, source_id, s))
    ]
    result = EmbedResult(0, len(all_shards) - len(pending), clip_id, redone=redone)
    if not pending:
        return result
    info, preprocess, tokenizer = FileInfo.of(bundle), bundle.preprocess, bundle.tokenizer
    del bundle

    ensure_started()
    shards = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=len(pending))
    # What a task holds beside its worker (torch and open_clip imported, ~650 MiB resident on
    # CPU): two chunks of pixels.
    task_memory = 2 * cfg.batch_size * _pixel_bytes(info) + 2**30
    per_shard_task = {"batch_size": 1, "num_cpus": cfg.decode_cpus, "memory": task_memory}
    shard_args = {"root": layout.root, "source": source_id}
    if cfg.fused:
        # One operator: a task per shard (decode_cpus each, as many at a time as Ray has CPUs
        # for), each decoding its shard and encoding it with the worker's cached CLIP.
        ds = shards.map_batches(
            _fused_udf,
            fn_kwargs={
                **shard_args,
                "clip_cfg": clip_cfg,
                "checkpoint": clip_checkpoint,
                "cfg": cfg,
                "clip_id": clip_id,
            },
            **per_shard_task,
        )
        # Ray Data's per-operator reservations exist to keep one operator from starving the
        # next; with a single operator they only hold CPUs back (on 2 CPUs: one task at a time
        # at first, and a scheduling round between a task's end and the next start). This
        # dataset's own context copy is changed, not the process-wide DataContext.
        ds.context.op_resource_reservation_enabled = False
    else:
        # Declaring memory (per_shard_task) also keeps decode in its own tasks: Ray Data fuses
        # a task map into the actor map after it when their remote args are equal, which would
        # decode inside the encoder.
        ds = shards.map_batches(
            _decode_udf,
            fn_kwargs={
                **shard_args,
                "preprocess": preprocess,
                "tokenizer": tokenizer,
                "chunk_size": cfg.batch_size,
                "dedup_captions": cfg.dedup_captions,
            },
            **per_shard_task,
        )
        encoders = max(1, min(cfg.num_actors, len(pending)))
        if cfg.device == "cuda":  # a GPU keeps its model resident: one actor per GPU
            ds = ds.map_batches(
                ClipEncoder,
                fn_constructor_args=(clip_cfg, clip_checkpoint, cfg),
                batch_size=cfg.batch_size,
                compute=ray.data.ActorPoolStrategy(size=encoders),
                num_gpus=1,
            )
        else:  # CPU: tasks in Ray's reused workers, at most ``num_actors`` at a time
            ds = ds.map_batches(
                _encode_udf,
                fn_kwargs={
                    "clip_cfg": clip_cfg,
                    "checkpoint": clip_checkpoint,
                    "cfg": cfg,
                    "clip_id": clip_id,
                },
                batch_size=cfg.batch_size,
                concurrency=encoders,
                num_cpus=1,
            )
    gather = _Gather(layout, info, source_id)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        gather.add(batch)
    if gather.unfinished():
        raise RuntimeError(f"embed {source_id}: shards {gather.unfinished()} never completed")
    result.shards_written = sum(r["written"] for r in gather.results)
    result.samples = sum(r["samples"] for r in gather.results)
    result.skipped_samples = {
        k: sum(r[k] for r in gather.results) for k in COUNT_KEYS if k != "samples"
    }
    return result
