"""URL lists: formats, column checks, source ids."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unclip.datasets.config import IngestConfig
from unclip.datasets.url_lists import read_url_list, source_id

ROWS = [
    {"URL": "http://a.example/1.jpg", "TEXT": "a red circle", "punsafe": 0.1},
    {
        "URL": "http://a.example/2.jpg",
        "TEXT": 'caption, with "quotes"\nand ünïcode',
        "punsafe": 0.2,
    },
]
CFG = IngestConfig(url_col="URL", caption_col="TEXT")


def _write(path, fmt: str, gz: bool = False) -> str:
    if fmt == "parquet":
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(ROWS), buf)
        data = buf.getvalue().to_pybytes()
    elif fmt == "jsonl":
        data = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    else:
        sep = "," if fmt == "csv" else "\t"

        def q(v):
            s = str(v)
            return '"' + s.replace('"', '""') + '"' if any(c in s for c in ',"\n\t') else s

        lines = [sep.join(ROWS[0])] + [sep.join(q(v) for v in r.values()) for r in ROWS]
        data = ("\n".join(lines) + "\n").encode()
    name = f"list.{fmt}" + (".gz" if gz else "")
    p = path / name
    p.write_bytes(gzip.compress(data) if gz else data)
    return str(p)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
@pytest.mark.parametrize("gz", [False, True])
def test_formats_give_canonical_columns_and_keep_extras(tmp_path, fmt, gz):
    t = read_url_list(_write(tmp_path, fmt, gz), CFG)
    assert t.column_names[:2] == ["url", "caption"]
    assert t.column("url").to_pylist() == [r["URL"] for r in ROWS]
    assert t.column("caption").to_pylist() == [r["TEXT"] for r in ROWS]
    assert t.column("punsafe").to_pylist() == [0.1, 0.2]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_wrong_column_names_file_and_column(tmp_path, fmt):
    path = _write(tmp_path, fmt)
    with pytest.raises(ValueError) as e:
        read_url_list(path, IngestConfig(url_col="URL", caption_col="caption"))
    assert path in str(e.value) and "'caption'" in str(e.value) and "caption_col" in str(e.value)


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "list.xlsx").write_bytes(b"x")
    with pytest.raises(ValueError, match="list.xlsx"):
        read_url_list(str(tmp_path / "list.xlsx"), CFG)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_url_list(str(tmp_path / "nope.csv"), CFG)


def test_reserved_extra_columns_are_kept_under_another_name(tmp_path):
    p = tmp_path / "l.jsonl"
    p.write_text(
        json.dumps({"url": "http://x/1", "caption": "c", "status": "old", "key": 3}) + "\n"
    )
    t = read_url_list(str(p), IngestConfig())
    assert t.column_names == ["url", "caption", "status_src", "key_src"]


def test_source_id_is_content_hash(tmp_path):
    a = _write(tmp_path, "csv")
    b = tmp_path / "copy.csv"
    b.write_bytes(open(a, "rb").read())
    assert source_id(a) == source_id(str(b))
    b.write_bytes(open(a, "rb").read() + b"http://x/3.jpg,more,0.3\n")
    assert source_id(a) != source_id(str(b))
