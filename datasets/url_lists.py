"""Reading URL lists: parquet / csv / tsv / jsonl (plain or .gz), local or any fsspec URI.

A list is returned with its url and caption columns renamed to ``url`` and ``caption`` (the names
img2dataset's downloader expects) and every other column carried through as shard metadata.
A list's source id is the hash of its bytes, so the same list added twice is one source.
A list is read once (:func:`load_url_list` gives its bytes, id and table together); a gzipped
list is decompressed in a stream up to ``ingest.max_url_list_bytes``, so a small ``.gz`` cannot
expand into the driver's memory without bound. Every way a list can be bad (truncated gzip,
corrupt deflate data, unparsable rows, a url column of lists) is a ValueError naming the file.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from .config import IngestConfig

FORMATS = ("parquet", "csv", "tsv", "jsonl", "json")
# Columns img2dataset writes itself; an input column of that name is kept under "{name}_src".
RESERVED = {
    "key",
    "status",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
    "exif",
    "md5",
    "sha256",
    "sha512",
}


def list_format(path: str, given: str | None = None) -> tuple[str, bool]:
    """(format, gzipped): ``given`` when set (``ingest.list_format``), else from the file name."""
    name = path.rsplit("/", 1)[-1].lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    if given is not None:
        return given, gz
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    if ext not in FORMATS:
        raise ValueError(
            f"{path}: unknown URL list format {ext!r}; use one of {list(FORMATS)} (+ .gz)"
        )
    return ("jsonl" if ext == "json" else ext), gz


def _read_bytes(path: str, limit: int | None = None) -> bytes:
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"URL list not found: {path}")
    with fs.open(p, "rb") as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise ValueError(f"{path}: larger than ingest.max_url_list_bytes={limit}")
    return data


def _gunzip(data: bytes, path: str, limit: int) -> bytes:
    """Decompress a gzip member stream, stopping with a ValueError past ``limit`` bytes."""
    out, size = [], 0
    d = zlib.decompressobj(wbits=31)
    try:
        buf = data
        while buf:
            chunk = d.decompress(buf, 1 << 20)
            size += len(chunk)
            if size > limit:
                raise ValueError(
                    f"{path}: decompresses to more than ingest.max_url_list_bytes={limit} bytes"
                )
            out.append(chunk)
            buf = d.unconsumed_tail
            if not buf and d.eof and d.unused_data:  # a further gzip member
                buf, d = d.unused_data, zlib.decompressobj(wbits=31)
    except zlib.error as e:
        raise ValueError(f"{path}: corrupt gzip data: {e}") from None
    if not d.eof:
        raise ValueError(f"{path}: truncated gzip file (ends before its last member does)")
    return b"".join(out)


GLOB_CHARS = ("*", "?", "[")


def is_glob(path: str) -> bool:
    """Whether ``path`` is a pattern (``*``, ``?`` or ``[``) rather than one file."""
    return any(c in path.split("://", 1)[-1] for c in GLOB_CHARS)


def expand(path: str) -> list[str]:
    """The files ``path`` names: itself, or, for a glob, every matching file in sorted order.

    Matches keep the pattern's scheme (``s3://…``), so each is a URI of its own; a glob matching
    no file is a FileNotFoundError naming it.
    """
    if not is_glob(path):
        return [path]
    fs, pattern = url_to_fs(path)
    matches = sorted(p for p in fs.glob(pattern) if fs.isfile(p))
    if not matches:
        raise FileNotFoundError(f"glob {path} matches no file")
    scheme = path.split("://", 1)[0] + "://" if "://" in path else ""
    return [scheme + m if scheme and not m.startswith(scheme) else m for m in matches]


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def source_id(path: str) -> str:
    """Short hex hash of the list's bytes: the same list twice is the same source."""
    return _hash(_read_bytes(path))


@dataclass
class LoadedList:
    """A URL list read once: its source id and its table."""

    source_id: str
    table: pa.Table


def _column_names(data: bytes, fmt: str, given: list[str] | None = None) -> list[str]:
    if fmt == "parquet":
        return pq.read_schema(pa.BufferReader(data)).names
    if fmt in ("csv", "tsv") and given:
        return list(given)
    if fmt in ("csv", "tsv"):
        first = data.split(b"\n", 1)[0].decode("utf-8-sig").rstrip("\r")
        return [c.strip('"') for c in first.split("\t" if fmt == "tsv" else ",")]
    return []  # jsonl: columns are known only after parsing


def read_url_list(path: str, cfg: IngestConfig) -> pa.Table:
    """The list as a table with ``url`` and ``caption`` string columns plus its extra columns."""
    return load_url_list(path, cfg).table


def load_url_list(path: str, cfg: IngestConfig) -> LoadedList:
    """Read ``path`` once: its source id (hash of the bytes) and its checked table."""
    fmt, gz = list_format(path, cfg.list_format)
    raw = _read_bytes(path, cfg.max_url_list_bytes)
    data = _gunzip(raw, path, cfg.max_url_list_bytes) if gz else raw
    return LoadedList(_hash(raw), _parse(data, fmt, path, cfg))


def _parse(data: bytes, fmt: str, path: str, cfg: IngestConfig) -> pa.Table:
    wanted = {"url_col": cfg.url_col, "caption_col": cfg.caption_col}
    try:
        names = _column_names(data, fmt, cfg.list_columns)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot parse as {fmt}: {e}") from e
    for field, col in wanted.items():
        if names and col not in names:
            raise ValueError(
                f"{path}: missing column {col!r} (ingest.{field}); columns are {names}"
            )
    try:
        if fmt == "parquet":
            table = pq.read_table(pa.BufferReader(data))
        elif fmt in ("csv", "tsv"):
            table = pacsv.read_csv(
                io.BytesIO(data),
                read_options=pacsv.ReadOptions(column_names=cfg.list_columns),
                parse_options=pacsv.ParseOptions(
                    delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True
                ),
                convert_options=pacsv.ConvertOptions(
                    column_types={cfg.url_col: pa.string(), cfg.caption_col: pa.string()},
                    strings_can_be_null=True,
                ),
            )
        else:
            table = pajson.read_json(io.BytesIO(data))
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot parse as {fmt}: {e}") from e
    for field, col in wanted.items():
        if col not in table.column_names:
            raise ValueError(
                f"{path}: missing column {col!r} (ingest.{field}); columns are {table.column_names}"
            )
    return normalize_columns(table, cfg, path)


def normalize_columns(table: pa.Table, cfg: IngestConfig, path: str = "<table>") -> pa.Table:
    """Rename url/caption columns to canonical names; make extra columns JSON-friendly."""
    cols: dict[str, pa.ChunkedArray] = {}
    for out, col in (("url", cfg.url_col), ("caption", cfg.caption_col)):
        try:
            cols[out] = table.column(col).cast(pa.string())
        except (pa.ArrowException, ValueError) as e:
            raise ValueError(
                f"{path}: column {col!r} must hold strings, not {table.column(col).type} ({e})"
            ) from None
    for name in table.column_names:
        if name in (cfg.url_col, cfg.caption_col):
            continue
        col = table.column(name)
        out = f"{name}_src" if name in RESERVED or name in ("url", "caption") else name
        if out in cols:
            raise ValueError(f"{path}: column {name!r} clashes with {out!r} after renaming")
        t = col.type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            continue  # not metadata a JSON sidecar can hold
        if (
            pa.types.is_temporal(t)
            or pa.types.is_decimal(t)
            or pa.types.is_dictionary(t)
            or pa.types.is_null(t)
        ):
            col = col.cast(pa.string())
        cols[out] = col
    return pa.table(cols)
