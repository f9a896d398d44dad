"""What an import stores: the same vector and score bits as the importer always stored, in input
order across shards written concurrently, in the vector layout of the current format, and files of
the older ``fixed_size_list`` layout still read the same."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unclip.datasets import embedding_import
from unclip.datasets.embedding_file import (
    PIPELINE_VERSION,
    check_embedding_schema,
    vector_array,
    vector_type,
    vectors_to_numpy,
)
from unclip.datasets.embedding_import import ImportSpec, import_embeddings
from unclip.datasets.storage import StorageLayout
from unclip.datasets.synthetic_embeddings import write_clip_retrieval

D = 32
# sha256 of the stored image / text float16 bits and float32 scores, all shards in order, as the
# importer wrote them with fixed_size_list vectors: a faster writer must store the same bits.
GOLDEN = {
    "float16-unit": "138a3983b590fe88d735e9c8950f2d187b0b3f6f277c9a98c10c924c765f42fd",
    "float32-raw": "8f62fe44f95bf4bc3b01e1b44df8553f1ad91b8f9672a0c0d290c59963dfa134",
}


def _input(tmp_path, kind: str):
    src = tmp_path / kind
    write_clip_retrieval(str(src), [300, 200], D, seed=7)
    if kind == "float32-raw":  # the normalising path: float32 rows of any length
        rng = np.random.default_rng(8)
        for side in ("img_emb/img_emb", "text_emb/text_emb"):
            for part, n in enumerate((300, 200)):
                x = rng.standard_normal((n, D)).astype(np.float32) * rng.uniform(0.5, 3, (n, 1))
                np.save(src / f"{side}_{part}.npy", x.astype(np.float32))
    return src


def _import(tmp_path, kind: str, **options):
    """(layout, record) of ``kind``'s input imported into a fresh store."""
    layout = StorageLayout(str(tmp_path / "store"))
    spec = ImportSpec(str(_input(tmp_path, kind)), "clip-retrieval", "M", "t", **options)
    return layout, import_embeddings(layout, spec)


def _first_file(layout, record) -> str:
    return layout.embedding_shard(record["clip_id"], record["source"], 0)


def _stored(layout, record):
    """(image float16, text float16, score float32) of every shard of an import, in shard order."""
    tables = [
        pq.read_table(layout.embedding_shard(record["clip_id"], record["source"], s["shard"]))
        for s in record["shards"]
    ]
    t = pa.concat_tables(tables)
    image = vectors_to_numpy(t.column("image_embedding")).astype(np.float16)
    text = vectors_to_numpy(t.column("text_embedding")).astype(np.float16)
    return image, text, t.column("clip_score").to_numpy()


def _digest(image, text, score) -> str:
    h = hashlib.sha256()
    for x in (image, text, score):
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("kind", sorted(GOLDEN))
def test_stored_bits_are_those_the_importer_always_stored(tmp_path, kind):
    layout, record = _import(tmp_path, kind, rows_per_shard=64)
    assert len(record["shards"]) == 5 + 4  # 300 → 4 × 64 + 44, 200 → 3 × 64 + 8
    assert _digest(*_stored(layout, record)) == GOLDEN[kind]


def test_vectors_are_one_fixed_size_binary_value_per_row_of_little_endian_halves(tmp_path):
    layout, record = _import(tmp_path, "float16-unit")
    path = _first_file(layout, record)
    schema = pq.read_schema(path)
    assert schema.metadata[b"unclip.pipeline_version"].decode() == PIPELINE_VERSION == "2"
    assert schema.field("image_embedding").type == vector_type(D) == pa.binary(2 * D)
    assert check_embedding_schema(path, schema, record["clip_id"], D) == D
    leaves = pq.ParquetFile(path).metadata.row_group(0)
    vec = {leaves.column(i).path_in_schema: leaves.column(i) for i in range(leaves.num_columns)}
    assert vec["image_embedding"].compression == "UNCOMPRESSED"  # nothing to squeeze in halves
    image = np.load(tmp_path / "float16-unit/img_emb/img_emb_0.npy")
    raw = pq.read_table(path).column("image_embedding").combine_chunks()
    assert raw[1].as_py() == image[1].astype("<f2").tobytes()


def test_vector_array_rounds_other_dtypes_and_byte_orders_to_little_endian_halves():
    x = np.random.default_rng(3).standard_normal((5, D))
    want = x.astype(np.float16).astype(np.float32)
    for given in (x, x.astype(np.float32), x.astype(">f2"), x.astype(np.float16)[:, ::1]):
        arr = vector_array(given)
        assert arr.type == vector_type(D)
        np.testing.assert_array_equal(vectors_to_numpy(arr), want)
    sliced = pa.chunked_array([vector_array(x)[1:3], vector_array(x)[4:]])
    np.testing.assert_array_equal(vectors_to_numpy(sliced), want[[1, 2, 4]])
    np.testing.assert_array_equal(vectors_to_numpy(vector_array(x)[2:4]), want[2:4])  # offset 2
    one = pa.chunked_array([vector_array(x)[3:]])
    np.testing.assert_array_equal(vectors_to_numpy(one), want[3:])


def test_a_vector_type_other_than_its_version_stores_is_named(tmp_path):
    layout, record = _import(tmp_path, "float16-unit")
    path = _first_file(layout, record)
    t = pq.read_table(path)
    pq.write_table(
        t.replace_schema_metadata({**t.schema.metadata, b"unclip.pipeline_version": b"1"}), path
    )
    with pytest.raises(
        ValueError,
        match=r"column 'image_embedding' is fixed_size_binary\[64\], "
        r"expected fixed_size_list<item: halffloat>\[32\]",
    ):
        check_embedding_schema(path, pq.read_schema(path), record["clip_id"], D)


def test_a_truncated_npy_part_is_named(tmp_path):
    src = _input(tmp_path, "float16-unit")
    npy = src / "text_emb" / "text_emb_1.npy"
    npy.write_bytes(npy.read_bytes()[:-10])  # the header still says 200 rows
    spec = ImportSpec(str(src), "clip-retrieval", "M", "t", rows_per_shard=64)
    with pytest.raises(ValueError, match=r"text_emb_1\.npy: truncated: rows 192-200"):
        import_embeddings(StorageLayout(str(tmp_path / "store")), spec)


def test_a_write_failing_mid_import_leaves_no_visible_file_and_a_rerun_completes(
    tmp_path, monkeypatch
):
    src = _input(tmp_path, "float32-raw")
    layout = StorageLayout(str(tmp_path / "store"))
    spec = ImportSpec(str(src), "clip-retrieval", "M", "t", rows_per_shard=64)
    real = embedding_import.write_embedding_table

    def failing(table, f):
        if table.schema.metadata[b"unclip.shard"] == b"5":
            f.write(b"PAR1 half a file")
            raise OSError("disk full")
        real(table, f)

    monkeypatch.setattr(embedding_import, "write_embedding_table", failing)
    with pytest.raises(OSError, match="disk full"):
        import_embeddings(layout, spec)
    folder = tmp_path / "store" / "embeddings" / spec.clip_id / spec.source_id
    written = sorted(p.name for p in folder.iterdir())
    assert "00005.parquet" not in written and "_import.json" not in written
    assert all(p.endswith(".parquet") and pq.read_metadata(folder / p) for p in written)
    monkeypatch.setattr(embedding_import, "write_embedding_table", real)
    record = import_embeddings(layout, spec)
    assert _digest(*_stored(layout, record)) == GOLDEN["float32-raw"]


@pytest.mark.parametrize("write_threads", [1, 3])
def test_chunks_in_flight_keep_their_own_rows_while_later_ones_are_read(
    tmp_path, monkeypatch, write_threads
):
    """Slow writers: the reader runs ahead by as many chunks as there are threads."""
    real = embedding_import.unit_pairs

    def slow(image, text):
        time.sleep(0.02)
        return real(image, text)

    monkeypatch.setattr(embedding_import, "unit_pairs", slow)
    layout, record = _import(
        tmp_path, "float16-unit", rows_per_shard=64, write_threads=write_threads
    )
    assert _digest(*_stored(layout, record)) == GOLDEN["float16-unit"]
