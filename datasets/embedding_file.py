"""The embedding Parquet file: its schema, how it is written, and the checks made on every read.

One file per image shard (docs/embeddings.md): ``key``, ``caption``, ``url`` strings,
``image_embedding`` / ``text_embedding`` as ``fixed_size_list<float16>[D]`` (L2-normalised),
``clip_score`` float32, then the shard's metadata columns; file metadata ``unclip.clip_id``,
``unclip.embedding_dim``, ``unclip.identity`` and ``unclip.pipeline_version``. Readers call
:func:`check_embedding_schema` on every file, so a file of another CLIP, another dimension or
another layout is an error naming the file, never mixed in.
"""

from __future__ import annotations

import json
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PIPELINE_VERSION = "1"
KNOWN_PIPELINE_VERSIONS = {"1"}
CLIP_ID_KEY = b"unclip.clip_id"
DIM_KEY = b"unclip.embedding_dim"
VERSION_KEY = b"unclip.pipeline_version"
EMBEDDING_COLUMNS = ("image_embedding", "text_embedding")
# The fixed columns and their types; D is filled in per file.
FIXED_COLUMNS: dict[str, pa.DataType | None] = {
    "key": pa.string(),
    "caption": pa.string(),
    "url": pa.string(),
    "image_embedding": None,  # fixed_size_list<float16>[D]
    "text_embedding": None,
    "clip_score": pa.float32(),
}


def fixed_list(x: np.ndarray) -> pa.FixedSizeListArray:
    """float [N, D] as a ``fixed_size_list<float16>[D]`` array."""
    return pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(x, dtype=np.float16).reshape(-1)), x.shape[1]
    )


def fixed_list_to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed_size_list<float16|float32>[D] column as float32 [N, D]."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    d = arr.type.list_size
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(arr), d).astype(np.float32)


def parquet_leaf_paths(schema: pa.Schema) -> list[str]:
    """The leaf column paths pyarrow writes ``schema`` as (``image_embedding.list.element``, …)."""
    sink = pa.BufferOutputStream()
    pq.ParquetWriter(sink, schema).close()
    written = pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema
    return [written.column(i).path for i in range(len(written))]


def write_embedding_table(table: pa.Table, f: IO[bytes]) -> None:
    """Write one embedding file: one row group; vectors PLAIN and snappy, no dictionary; the
    other columns zstd.

    The float16 vectors are PLAIN-encoded: DuckDB, Polars and pyarrow all read that, while
    byte-stream-split float16 (what files written before used, still read here) stops DuckDB.
    They are snappy-compressed, which costs no measurable CPU and squeezes only the list levels
    (2.0 bytes per dimension for any D): zstd would save 8 % more of a vector (its sign and
    exponent bits) for a quarter more CPU to write and to read, and dictionary encoding only adds
    bytes (docs/embeddings.md).
    """
    vectors = [f"{c}.list.element" for c in EMBEDDING_COLUMNS]
    others = [c for c in parquet_leaf_paths(table.schema) if c not in vectors]
    pq.write_table(
        table,
        f,
        compression={**dict.fromkeys(others, "zstd"), **dict.fromkeys(vectors, "snappy")},
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
    d = int((schema.metadata or {})[DIM_KEY])
    for name, expected in FIXED_COLUMNS.items():
        if name not in schema.names:
            raise ValueError(f"{path}: no column {name!r} (not an unclip embedding file?)")
        found = schema.field(name).type
        expected = expected or pa.list_(pa.float16(), d)
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
            "image_embedding": fixed_list(image),
            "text_embedding": fixed_list(text),
            "clip_score": pa.array(clip_score, pa.float32()),
        }
    )
    for name in extra.column_names if extra is not None else []:
        if name not in OWN_COLUMNS:
            table = table.append_column(name, extra.column(name))
    return table
