"""The embedding Parquet file: its schema, how it is written, and the checks made on every read.

One file per image shard (docs/embeddings.md): ``key``, ``caption``, ``url`` strings,
``image_embedding`` / ``text_embedding`` as ``fixed_size_binary[2·D]`` (D little-endian float16,
L2-normalised; ``fixed_size_list<float16>[D]`` in files of pipeline version 1, still read),
``clip_score`` float32, then the shard's metadata columns; file metadata ``unclip.clip_id``,
``unclip.embedding_dim``, ``unclip.identity`` and ``unclip.pipeline_version``. Readers call
:func:`check_embedding_schema` on every file, so a file of another CLIP, another dimension or
another layout is an error naming the file, never mixed in, and readers take vectors through
:func:`vectors_to_numpy`, which reads both vector layouts.
"""

from __future__ import annotations

import json
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PIPELINE_VERSION = "2"
CLIP_ID_KEY = b"unclip.clip_id"
DIM_KEY = b"unclip.embedding_dim"
VERSION_KEY = b"unclip.pipeline_version"
EMBEDDING_COLUMNS = ("image_embedding", "text_embedding")
# The fixed columns and their types; D is filled in per file.
FIXED_COLUMNS: dict[str, pa.DataType | None] = {
    "key": pa.string(),
    "caption": pa.string(),
    "url": pa.string(),
    "image_embedding": None,  # VECTOR_TYPES[version](D)
    "text_embedding": None,
    "clip_score": pa.float32(),
}


def vector_type(d: int) -> pa.DataType:
    """The stored type of D float16 dimensions: one ``fixed_size_binary[2·D]`` value per row."""
    return pa.binary(2 * d)


# The vector type each pipeline version stores D dimensions as; files of every one are read.
VECTOR_TYPES = {"1": lambda d: pa.list_(pa.float16(), d), "2": vector_type}
KNOWN_PIPELINE_VERSIONS = set(VECTOR_TYPES)


def vector_array(x: np.ndarray) -> pa.FixedSizeBinaryArray:
    """float [N, D] rounded to float16, as ``fixed_size_binary[2·D]`` (little-endian halves).

    One value per row: Parquet writes it as one FIXED_LEN_BYTE_ARRAY per row with no
    repetition or definition levels, which a ``fixed_size_list`` needs per dimension.
    """
    half = np.ascontiguousarray(x, dtype="<f2")
    n, d = half.shape
    return pa.FixedSizeBinaryArray.from_buffers(vector_type(d), n, [None, pa.py_buffer(half)])


def vector_dim(t: pa.DataType) -> int:
    """D of a vector column's type: ``fixed_size_binary[2·D]``, or the older list of D."""
    if pa.types.is_fixed_size_binary(t):
        return t.byte_width // 2
    if pa.types.is_fixed_size_list(t):
        return t.list_size
    raise TypeError(f"{t} is not an embedding vector type")


def vectors_to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A vector column as float32 [N, D]: ``fixed_size_binary[2·D]`` of float16 (written now), or
    ``fixed_size_list<float16|float32>[D]`` (files written before)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_fixed_size_list(arr.type):
        values = arr.flatten().to_numpy(zero_copy_only=False)
        return values.reshape(len(arr), arr.type.list_size).astype(np.float32)
    width = arr.type.byte_width  # vectors are never null: the data buffer holds every row
    half = np.frombuffer(arr.buffers()[1], "<f2", len(arr) * width // 2, arr.offset * width)
    return half.reshape(len(arr), width // 2).astype(np.float32)


def parquet_leaf_paths(schema: pa.Schema) -> list[str]:
    """The leaf column paths pyarrow writes ``schema`` as (``caption``, ``tags.list.element``, …)."""
    sink = pa.BufferOutputStream()
    pq.ParquetWriter(sink, schema).close()
    written = pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema
    return [written.column(i).path for i in range(len(written))]


def write_embedding_table(table: pa.Table, f: IO[bytes]) -> None:
    """Write one embedding file: one row group; vectors PLAIN, uncompressed, no dictionary or
    statistics; the other columns zstd.

    A vector is one ``fixed_size_binary[2·D]`` value, copied into the page as it is: no levels
    per dimension (what made a ``fixed_size_list`` cost ~10 ns per dimension to write and to
    read) and no codec, since snappy finds nothing to squeeze in float16 values (the same bytes,
    ~15 % more CPU) and zstd's 8 % (sign and exponent bits) would double the write
    (docs/embeddings.md, Speed).
    """
    vectors = list(EMBEDDING_COLUMNS)
    others = [c for c in parquet_leaf_paths(table.schema) if c not in vectors]
    pq.write_table(
        table,
        f,
        compression={**dict.fromkeys(others, "zstd"), **dict.fromkeys(vectors, "none")},
        row_group_size=max(1, table.num_rows),
        use_dictionary=[c for c in others if c != "clip_score"],
        column_encoding={**dict.fromkeys(vectors, "PLAIN"), "clip_score": "PLAIN"},
        write_statistics=["key", "clip_score"],
        data_page_version="1.0",  # the pages every Parquet reader reads
    )


def check_embedding_metadata(
    path: str, schema: pa.Schema, clip_id: str | None, embedding_dim: int | None
) -> None:
    """Raise if an embedding file was written by another CLIP or has another dimension."""
    meta = schema.metadata or {}
    if clip_id is not None:
        found = meta.get(CLIP_ID_KEY, b"").decode() or None
        if found != clip_id:
            raise ValueError(
                f"{path}: embeddings were written by CLIP {found!r}, the manifest expects {clip_id!r}"
            )
    if embedding_dim is not None:
        found_dim = meta.get(DIM_KEY)
        if found_dim is None or int(found_dim) != int(embedding_dim):
            raise ValueError(
                f"{path}: embedding_dim {found_dim!r} in file, the manifest expects {embedding_dim}"
            )
    version = meta.get(VERSION_KEY, b"").decode()
    if version not in KNOWN_PIPELINE_VERSIONS:
        raise ValueError(
            f"{path}: pipeline_version {version or None!r}, this unclip reads "
            f"{sorted(KNOWN_PIPELINE_VERSIONS)} (written by another unclip?)"
        )


def check_embedding_schema(
    path: str, schema: pa.Schema, clip_id: str | None, embedding_dim: int | None
) -> int:
    """Check a whole file's schema (metadata, fixed columns and their types); returns D."""
    check_embedding_metadata(path, schema, clip_id, embedding_dim)
    meta = schema.metadata or {}
    d = int(meta[DIM_KEY])
    vectors = VECTOR_TYPES[meta[VERSION_KEY].decode()](d)
    for name, expected in FIXED_COLUMNS.items():
        if name not in schema.names:
            raise ValueError(f"{path}: no column {name!r} (not an unclip embedding file?)")
        found = schema.field(name).type
        expected = expected or vectors
        if found != expected:
            raise ValueError(f"{path}: column {name!r} is {found}, expected {expected}")
    return d


def file_metadata(
    clip_id: str, dim: int, identity: dict[str, Any], source: str, shard: int
) -> dict[str, str]:
    """The key-value metadata every embedding file carries."""
    return {
        "unclip.clip_id": clip_id,
        "unclip.embedding_dim": str(dim),
        # without "source": where the checkpoint lives must not change the file's bytes
        "unclip.identity": json.dumps(
            {k: v for k, v in identity.items() if k != "source"}, sort_keys=True, default=str
        ),
        "unclip.pipeline_version": PIPELINE_VERSION,
        "unclip.source": source,
        "unclip.shard": str(shard),
    }


# Columns the fixed part of the schema owns; a carried metadata column of that name is dropped.
OWN_COLUMNS = ("key", "caption", "url", "image_embedding", "text_embedding", "clip_score")


def embedding_table(
    keys: list[str],
    captions: list[str],
    urls: pa.Array | pa.ChunkedArray,
    image: np.ndarray,
    text: np.ndarray,
    clip_score: np.ndarray,
    extra: pa.Table | None = None,
) -> pa.Table:
    """The fixed columns (vectors rounded to float16) followed by ``extra``'s other columns."""
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "caption": pa.array(captions, pa.string()),
            "url": urls.cast(pa.string()),
            "image_embedding": vector_array(image),
            "text_embedding": vector_array(text),
            "clip_score": pa.array(clip_score, pa.float32()),
        }
    )
    for name in extra.column_names if extra is not None else []:
        if name not in OWN_COLUMNS:
            table = table.append_column(name, extra.column(name))
    return table
