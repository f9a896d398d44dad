"""Importing precomputed CLIP embeddings (clip-retrieval's npy layout, DataComp's npz) into the store.

LAION and DataComp ship their pairs' CLIP embeddings; importing them lets the prior train without
re-embedding. An import writes ordinary embedding files (``embedding_file``) under
``embeddings/{clip_id}/{source}/{shard:05d}.parquet``, where ``clip_id`` is
:func:`imported_clip_id` of the model name and pretrained tag the user gives, then
``_import.json`` (the commit record). There are no image shards: such a source serves the prior,
and the decoder refuses it. Input parts are read in chunks of ``rows_per_shard`` rows (npy files
by seeking, metadata by Parquet batches) on this thread; each chunk is normalised, scored and
written (temporary name, then rename) on one of ``write_threads`` threads while the next is read,
so memory holds ``write_threads`` + 1 chunks whatever the part's size; a killed import resumes at
the first shard not yet written.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from .embedding_file import embedding_table, file_metadata, write_embedding_table
from .storage import StorageLayout, atomic_write, exists, read_json, write_json

IMPORT_RECORD = "_import.json"
ImportFormat = Literal["clip-retrieval", "datacomp"]
_PART_NUMBER = re.compile(r"(\d+)\.(?:npy|npz|parquet)$")


def imported_clip_id(model_name: str, pretrained: str) -> str:
    """The id imported embeddings are filed under: a hash of the open_clip name and tag given."""
    ident = json.dumps({"imported": True, "model_name": model_name, "pretrained": pretrained})
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def import_record_path(layout: StorageLayout, clip_id: str, source: str) -> str:
    """Where an import's commit record lives (written after its last shard)."""
    return layout.join("embeddings", clip_id, source, IMPORT_RECORD)


def imported_sources(layout: StorageLayout, clip_id: str) -> list[str]:
    """Sources imported for ``clip_id`` whose import is committed."""
    fs, d = url_to_fs(layout.join("embeddings", clip_id))
    if not fs.exists(d):
        return []
    return sorted(p.rstrip("/").rsplit("/", 2)[-2] for p in fs.glob(f"{d}/*/{IMPORT_RECORD}"))


def imported_shards(layout: StorageLayout, clip_id: str, source: str) -> list[int]:
    """Shard ids of a committed import (none when ``source`` is not an import of ``clip_id``)."""
    path = import_record_path(layout, clip_id, source)
    return [s["shard"] for s in read_json(path)["shards"]] if exists(path) else []


@dataclass(frozen=True)
class InputPart:
    """One part of the input: its image / text embedding arrays and its metadata file."""

    number: int
    image: str
    text: str
    metadata: str
    image_key: str | None = None  # npz member names (DataComp)
    text_key: str | None = None


def _numbered(fs: Any, folder: str, pattern: str) -> dict[int, str]:
    out = {}
    for p in fs.glob(f"{folder}/{pattern}"):
        m = _PART_NUMBER.search(p)
        if m:
            out[int(m.group(1))] = p
    return out


def find_parts(
    uri: str, fmt: ImportFormat, image_key: str = "l14_img", text_key: str = "l14_txt"
) -> tuple[Any, list[InputPart]]:
    """The filesystem and the aligned input parts under ``uri``, by part number.

    clip-retrieval: ``img_emb/img_emb_{n}.npy``, ``text_emb/text_emb_{n}.npy``,
    ``metadata/metadata_{n}.parquet``; DataComp: ``{n}.npz`` beside ``{n}.parquet``. A part
    lacking one of its files is a FileNotFoundError naming it.
    """
    fs, root = url_to_fs(uri.rstrip("/"))
    if not fs.exists(root):
        raise FileNotFoundError(f"import-embeddings: {uri} does not exist")
    if fmt == "clip-retrieval":
        image = _numbered(fs, f"{root}/img_emb", "img_emb_*.npy")
        text = _numbered(fs, f"{root}/text_emb", "text_emb_*.npy")
        meta = _numbered(fs, f"{root}/metadata", "metadata_*.parquet")
    else:
        image = text = _numbered(fs, root, "*.npz")
        meta = _numbered(fs, root, "*.parquet")
    if not image:
        where = "img_emb/img_emb_*.npy" if fmt == "clip-retrieval" else "*.npz"
        raise FileNotFoundError(f"import-embeddings: no {where} under {uri}")
    parts = []
    for n in sorted(image):
        for kind, found in (("text embeddings", text), ("metadata", meta)):
            if n not in found:
                raise FileNotFoundError(
                    f"import-embeddings: {image[n]} has no {kind} file of part {n} under {uri} "
                    "(the prior needs both embeddings and the captions)"
                )
        keys = (image_key, text_key) if fmt == "datacomp" else (None, None)
        parts.append(InputPart(n, image[n], text[n], meta[n], *keys))
    return fs, parts


class _NpyRows:
    """Rows of one ``.npy`` file read by seeking (never the whole file), or one npz member."""

    def __init__(self, fs: Any, path: str, member: str | None) -> None:
        self.path, self.member = path, member
        if member is not None:  # an npz member is compressed: it is one part, read whole
            with fs.open(path, "rb") as f, np.load(f) as z:
                if member not in z.files:
                    raise KeyError(f"{path}: no array {member!r}; it holds {sorted(z.files)}")
                self.array: np.ndarray | None = np.asarray(z[member])
            self.shape, self.dtype = self.array.shape, self.array.dtype
            return
        self.array = None
        self.file: IO[bytes] = fs.open(path, "rb")
        version = np.lib.format.read_magic(self.file)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        self.shape, fortran, self.dtype = read_header(self.file)
        if fortran or len(self.shape) != 2:
            raise ValueError(f"{path}: expected a C-order [N, D] array, got shape {self.shape}")
        self.offset = self.file.tell()

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` in the file's dtype."""
        if self.array is not None:
            return self.array[start:stop]
        out = np.empty((stop - start, self.shape[1]), self.dtype)
        self.file.seek(self.offset + start * out.strides[0])
        # into the array: a bytes object of a chunk's size costs 4 times as long to fill
        got = self.file.readinto(memoryview(out).cast("B"))
        if got != out.nbytes:
            raise ValueError(f"{self.path}: truncated: rows {start}-{stop} of {self.shape} short")
        return out

    def close(self) -> None:
        if self.array is None:
            self.file.close()


def _metadata_chunks(fs: Any, path: str, rows: int) -> Iterator[pa.Table]:
    """The metadata Parquet in tables of exactly ``rows`` rows (the last may be shorter)."""
    with fs.open(path, "rb") as f:
        pending: list[pa.RecordBatch] = []
        held = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=rows):
            pending.append(batch)
            held += batch.num_rows
            while held >= rows:
                table = pa.Table.from_batches(pending)
                yield table.slice(0, rows)
                rest = table.slice(rows)
                pending, held = rest.to_batches(), rest.num_rows
        if held:
            yield pa.Table.from_batches(pending)


# Rows converted to float32 at a time: an image and a text block stay in one core's cache.
_BLOCK_ROWS = 256


def unit_pairs(image: np.ndarray, text: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image vectors to store, text vectors to store, CLIP score), one pass over both.

    The score is the dot product of the rows normalised in float32. float16 rows already of unit
    length (what clip-retrieval writes) are stored as they are; a matrix with any other row, or
    of another dtype, is stored normalised.
    """
    n = len(image)
    score = np.empty(n, np.float32)
    norms = np.empty((2, n), np.float32)
    for start in range(0, n, _BLOCK_ROWS):
        rows = slice(start, start + _BLOCK_ROWS)
        block = image[rows].astype(np.float32), text[rows].astype(np.float32)
        for side, x in enumerate(block):
            norms[side, rows] = np.sqrt(np.einsum("nd,nd->n", x, x))
            x /= np.maximum(norms[side, rows], 1e-12)[:, None]
        score[rows] = np.einsum("nd,nd->n", *block)
    return _stored(image, norms[0]), _stored(text, norms[1]), score


def _stored(raw: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """``raw`` as it is when every row is float16 of unit length, else normalised (float16)."""
    if raw.dtype == np.float16 and np.all(np.abs(norms - 1) < 2e-3):
        return raw
    out = np.empty(raw.shape, np.float16)
    for start in range(0, len(raw), _BLOCK_ROWS):
        rows = slice(start, start + _BLOCK_ROWS)
        out[rows] = raw[rows].astype(np.float32) / np.maximum(norms[rows], 1e-12)[:, None]
    return out


@dataclass(frozen=True)
class ImportSpec:
    """What is imported and how it is filed: input, its format, the CLIP it came from, columns."""

    uri: str
    fmt: ImportFormat
    model_name: str
    pretrained: str
    source: str | None = None  # None: a hash of uri, format, model and tag
    caption_col: str = "caption"
    url_col: str = "url"
    rows_per_shard: int = 65536
    image_key: str = "l14_img"
    text_key: str = "l14_txt"
    write_threads: int = 2

    @property
    def clip_id(self) -> str:
        return imported_clip_id(self.model_name, self.pretrained)

    @property
    def source_id(self) -> str:
        if self.source is not None:
            return self.source
        ident = json.dumps(
            [self.uri, self.fmt, self.model_name, self.pretrained, self.rows_per_shard]
        )
        return "import-" + hashlib.sha256(ident.encode()).hexdigest()[:12]


def _column(table: pa.Table, name: str, path: str, option: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise ValueError(f"{path}: no column {name!r} ({option}); columns are {table.column_names}")
    return table.column(name)


def _carried(meta: pa.Table) -> pa.Table:
    """Metadata columns kept beside the embeddings: the input's ``key`` becomes ``key_src``.

    A ``key_src`` already there (an export of an import) wins over ``key``, which was then ours.
    """
    if "key" not in meta.column_names:
        return meta
    if "key_src" in meta.column_names:
        return meta.drop_columns(["key"])
    return meta.rename_columns(["key_src" if c == "key" else c for c in meta.column_names])


@dataclass(frozen=True)
class _Chunk:
    """One shard's input as read: raw vectors (float16 or float32) and its metadata rows."""

    part: InputPart
    shard: int
    start: int  # the part's row of the chunk's first row
    image: np.ndarray
    text: np.ndarray
    meta: pa.Table


class _Writers:
    """Turns chunks into files on a few threads while the next chunk is read: normalising, the
    CLIP score and the Parquet encoding release the GIL, so on more than one core the import
    takes about as long as its reads. At most ``workers`` chunks are in flight, each chunk goes
    to its own shard's file whatever order the threads finish in, and the first failure is
    raised."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="import-write")
        self.workers = workers
        self.pending: deque[Future[None]] = deque()

    def submit(self, layout: StorageLayout, spec: ImportSpec, chunk: _Chunk) -> None:
        while len(self.pending) >= self.workers:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(_write_chunk, layout, spec, chunk))

    def close(self) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _write_chunk(layout: StorageLayout, spec: ImportSpec, chunk: _Chunk) -> None:
    """One shard's embedding file (through a temporary name) from its chunk as read."""
    img, txt, score = unit_pairs(chunk.image, chunk.text)
    meta, part = chunk.meta, chunk.part
    captions = meta.column(spec.caption_col)
    table = embedding_table(
        [f"{part.number:05d}_{r:09d}" for r in range(chunk.start, chunk.start + meta.num_rows)],
        [str(c) for c in captions.to_pylist()],
        meta.column(spec.url_col),
        img,
        txt,
        score,
        _carried(meta).drop_columns([spec.caption_col, spec.url_col]),
    )
    identity = {"model_name": spec.model_name, "pretrained": spec.pretrained, "imported": True}
    d = chunk.image.shape[1]
    table = table.replace_schema_metadata(
        file_metadata(spec.clip_id, d, identity, spec.source_id, chunk.shard)
    )
    with atomic_write(layout.embedding_shard(spec.clip_id, spec.source_id, chunk.shard)) as f:
        write_embedding_table(table, f)


def _write_part_shards(
    layout: StorageLayout,
    spec: ImportSpec,
    fs: Any,
    part: InputPart,
    first_shard: int,
    writers: _Writers,
) -> list[dict[str, Any]]:
    """Read the chunks of one input part and hand those not yet written to ``writers``; the
    record entries of all its shards."""
    image = _NpyRows(fs, part.image, part.image_key)
    text = _NpyRows(fs, part.text, part.text_key)
    try:
        n = image.shape[0]
        if text.shape != image.shape:
            raise ValueError(
                f"{part.text}: text embeddings {text.shape}, image embeddings {image.shape} "
                f"in {part.image}"
            )
        out, start = [], 0
        for i, meta in enumerate(_metadata_chunks(fs, part.metadata, spec.rows_per_shard)):
            stop = start + meta.num_rows
            if stop > n:
                raise ValueError(
                    f"{part.metadata}: more rows than the {n} embeddings of {part.image}"
                )
            shard = first_shard + i
            if not exists(layout.embedding_shard(spec.clip_id, spec.source_id, shard)):
                _column(meta, spec.caption_col, part.metadata, "--caption-col")
                _column(meta, spec.url_col, part.metadata, "--url-col")
                rows = image.rows(start, stop), text.rows(start, stop)
                writers.submit(layout, spec, _Chunk(part, shard, start, *rows, meta))
            out.append({"shard": shard, "part": part.number, "rows": stop - start})
            start = stop
        if start != n:
            raise ValueError(f"{part.metadata}: {start} rows, {part.image} has {n} embeddings")
        return out
    finally:
        image.close()
        text.close()


def import_embeddings(layout: StorageLayout, spec: ImportSpec) -> dict[str, Any]:
    """Import every part of ``spec.uri`` (resuming a killed import); the commit record.

    A committed import of the same source is returned as it is, without reading the input.
    """
    record_path = import_record_path(layout, spec.clip_id, spec.source_id)
    if exists(record_path):
        return read_json(record_path)
    fs, parts = find_parts(spec.uri, spec.fmt, spec.image_key, spec.text_key)
    identity_path = layout.join("clip", spec.clip_id, "identity.json")
    if not exists(identity_path):
        write_json(
            identity_path,
            {"model_name": spec.model_name, "pretrained": spec.pretrained, "imported": True},
        )
    shards: list[dict[str, Any]] = []
    writers = _Writers(spec.write_threads)
    try:
        for part in parts:
            shards += _write_part_shards(layout, spec, fs, part, len(shards), writers)
    finally:
        writers.close()
    record = {
        "source": spec.source_id,
        "clip_id": spec.clip_id,
        "model_name": spec.model_name,
        "pretrained": spec.pretrained,
        "origin": spec.uri,
        "format": spec.fmt,
        "num_samples": sum(s["rows"] for s in shards),
        "shards": shards,
    }
    write_json(record_path, record)  # last: the commit of the import
    return record
