"""Embedding interop: importing clip-retrieval / DataComp embeddings, exporting clip-retrieval's
layout (read back with the real embedding-reader), and files DuckDB, Polars and pandas read."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unclip.datasets.embedding_export import export_embeddings
from unclip.datasets.embedding_file import (
    EMBEDDING_COLUMNS,
    check_embedding_schema,
    embedding_table,
    vectors_to_numpy,
    write_embedding_table,
)
from unclip.datasets.embedding_import import (
    ImportSpec,
    import_embeddings,
    imported_clip_id,
    imported_sources,
)
from unclip.datasets.manifest import assemble_manifest
from unclip.datasets.readers import load_embeddings, load_image_pairs, read_embedding_table
from unclip.datasets.storage import StorageLayout
from unclip.datasets.stream import RankStream, StreamPlan
from unclip.datasets.stream_sources import EmbeddingSource, ImagePairSource
from unclip.datasets.synthetic_embeddings import write_clip_retrieval, write_datacomp

D = 16
MODEL, TAG = "ViT-L-14", "laion2b_s32b_b82k"


@pytest.fixture
def laion_dir(tmp_path):
    out = tmp_path / "laion-emb"
    write_clip_retrieval(str(out), [5, 7], D, seed=1)
    return out


def _spec(uri, **kw):
    return ImportSpec(str(uri), kw.pop("fmt", "clip-retrieval"), MODEL, TAG, rows_per_shard=4, **kw)


def _unit(x):
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_clip_retrieval_parts_become_checked_embedding_files(tmp_path, laion_dir):
    layout = StorageLayout(str(tmp_path / "store"))
    record = import_embeddings(layout, _spec(laion_dir))
    clip_id = imported_clip_id(MODEL, TAG)
    assert record["clip_id"] == clip_id and record["num_samples"] == 12
    # chunks of 4 rows, never across parts: 5 → 4 + 1, 7 → 4 + 3
    assert [(s["part"], s["rows"]) for s in record["shards"]] == [(0, 4), (0, 1), (1, 4), (1, 3)]
    assert imported_sources(layout, clip_id) == [record["source"]]
    tables = []
    for s in record["shards"]:
        path = layout.embedding_shard(clip_id, record["source"], s["shard"])
        assert check_embedding_schema(path, pq.read_schema(path), clip_id, D) == D
        tables.append(pq.read_table(path))
    got = pa.concat_tables(tables)
    img = np.concatenate([np.load(laion_dir / f"img_emb/img_emb_{i}.npy") for i in (0, 1)])
    txt = np.concatenate([np.load(laion_dir / f"text_emb/text_emb_{i}.npy") for i in (0, 1)])
    np.testing.assert_allclose(
        vectors_to_numpy(got.column("image_embedding")), _unit(img), atol=1e-3
    )
    np.testing.assert_allclose(
        vectors_to_numpy(got.column("text_embedding")), _unit(txt), atol=1e-3
    )
    np.testing.assert_allclose(
        got.column("clip_score").to_numpy(), (_unit(img) * _unit(txt)).sum(1), atol=1e-5
    )
    meta = pa.concat_tables(
        [pq.read_table(laion_dir / f"metadata/metadata_{i}.parquet") for i in (0, 1)]
    )
    assert got.column("caption").to_pylist() == meta.column("caption").to_pylist()
    assert got.column("url").to_pylist() == meta.column("url").to_pylist()
    assert got.column("key_src").to_pylist() == meta.column("key").to_pylist()  # kept, renamed
    assert got.column("similarity").to_pylist() == meta.column("similarity").to_pylist()
    assert len(set(got.column("key").to_pylist())) == 12


def test_a_killed_import_resumes_at_the_missing_shard(tmp_path, laion_dir):
    layout = StorageLayout(str(tmp_path / "store"))
    record = import_embeddings(layout, _spec(laion_dir))
    clip_id, source = record["clip_id"], record["source"]
    paths = [Path(layout.embedding_shard(clip_id, source, s)) for s in range(4)]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}
    (paths[0].parent / "_import.json").unlink()  # killed before its commit...
    paths[2].unlink()  # ...and before shard 2 was renamed into place
    assert import_embeddings(layout, _spec(laion_dir)) == record
    for p in paths:
        assert p.read_bytes() == before[p][0]
    assert [p.stat().st_mtime_ns == before[p][1] for p in paths] == [True, True, False, True]


def test_a_part_without_text_embeddings_is_named(tmp_path, laion_dir):
    (laion_dir / "text_emb" / "text_emb_1.npy").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"img_emb_1\.npy has no text embeddings file of part 1"
    ):
        import_embeddings(StorageLayout(str(tmp_path / "s")), _spec(laion_dir))


def test_a_caption_column_the_metadata_lacks_is_named(tmp_path, laion_dir):
    with pytest.raises(
        ValueError, match=r"metadata_0\.parquet: no column 'TEXT' \(--caption-col\)"
    ):
        import_embeddings(StorageLayout(str(tmp_path / "s")), _spec(laion_dir, caption_col="TEXT"))


def test_datacomp_npz_imports_the_chosen_arrays(tmp_path):
    src = tmp_path / "datacomp"
    write_datacomp(str(src), [6, 3], D, seed=2)
    layout = StorageLayout(str(tmp_path / "store"))
    record = import_embeddings(layout, _spec(src, fmt="datacomp", caption_col="text"))
    assert record["num_samples"] == 9
    got = pa.concat_tables(
        pq.read_table(layout.embedding_shard(record["clip_id"], record["source"], s["shard"]))
        for s in record["shards"]
    )
    with np.load(src / "00000000.npz") as z:
        np.testing.assert_allclose(
            vectors_to_numpy(got.column("image_embedding"))[:6], _unit(z["l14_img"]), atol=1e-3
        )
    assert got.column("caption").to_pylist()[6] == "a photo 1-0"


def _prior_batches(source, batch=3, steps=4):
    plan = StreamPlan.make(source.shards, 0, 1, batch, 8, seed=0)
    return list(itertools.islice(RankStream(source, plan, prefetch=0).batches(0), steps))


def test_an_embeddings_only_manifest_serves_the_prior_and_is_refused_for_the_decoder(
    tmp_path, laion_dir
):
    layout = StorageLayout(str(tmp_path / "store"))
    record = import_embeddings(layout, _spec(laion_dir))
    manifest = assemble_manifest(layout, record["clip_id"], [record["source"]])
    assert manifest["num_samples"] == 12 and len(manifest["shards"]) == 4
    assert all(s["images"] is None for s in manifest["shards"])
    batches = _prior_batches(EmbeddingSource(layout, manifest, "all", 0.0))
    assert [b["image_embedding"].shape for b in batches] == [(3, D)] * 4
    keys = [k for b in batches for k in b["key"]]
    assert len(set(keys)) == 12  # the whole import, each sample once
    with pytest.raises(ValueError, match=r"have embeddings only .*decoder") as e:
        ImagePairSource(layout, manifest, "all", 0.0, image_size=16)
    assert record["source"] in str(e.value)
    with pytest.raises(ValueError, match="embeddings only"):
        load_image_pairs(layout, manifest, "all", 0.0)


def test_export_is_read_by_embedding_reader_and_imports_back(tmp_path, laion_dir):
    from embedding_reader import EmbeddingReader

    layout = StorageLayout(str(tmp_path / "store"))
    record = import_embeddings(layout, _spec(laion_dir))
    manifest = assemble_manifest(layout, record["clip_id"], [record["source"]])
    out = tmp_path / "export"
    done = export_embeddings(layout, manifest["version"], str(out))
    assert done["num_samples"] == 12 and len(done["parts"]) == 4
    ours = load_embeddings(layout, manifest, "all", 0.0)
    reader = EmbeddingReader(
        str(out / "img_emb"),
        file_format="parquet_npy",
        meta_columns=["caption", "url"],
        metadata_folder=str(out / "metadata"),
    )
    assert (reader.count, reader.dimension) == (12, D)
    emb, meta = zip(*reader(batch_size=5, show_progress=False), strict=True)
    emb, meta = np.concatenate(emb), pa.concat_tables(pa.Table.from_pandas(m) for m in meta)
    np.testing.assert_array_equal(emb.astype(np.float32), ours.image)  # float16 kept exactly
    assert meta.column("caption").to_pylist() == ours.captions
    text = EmbeddingReader(str(out / "text_emb"), file_format="npy")
    np.testing.assert_array_equal(
        np.concatenate([e for e, _ in text(batch_size=12, show_progress=False)]).astype(np.float32),
        ours.text,
    )
    # The exported layout imports back to the same vectors.
    again = import_embeddings(
        layout, ImportSpec(str(out), "clip-retrieval", MODEL, TAG, source="back")
    )
    back = pa.concat_tables(
        read_embedding_table(
            layout,
            {
                "source": "back",
                "shard": s["shard"],
                "embeddings": os.path.relpath(
                    layout.embedding_shard(again["clip_id"], "back", s["shard"]), layout.root
                ),
            },
        )
        for s in again["shards"]
    )
    np.testing.assert_allclose(
        vectors_to_numpy(back.column("image_embedding")), ours.image, atol=1e-3
    )
    with pytest.raises(ValueError, match="export each version to a folder of its own"):
        export_embeddings(layout, "another-version", str(out))


def _written_file(tmp_path, rows: int = 6, dim: int = D) -> Path:
    """One embedding file as the importer writes it."""
    layout = StorageLayout(str(tmp_path / "store"))
    src = tmp_path / "src"
    write_clip_retrieval(str(src), [rows], dim, seed=3)
    record = import_embeddings(
        layout, ImportSpec(str(src), "clip-retrieval", MODEL, TAG, rows_per_shard=rows)
    )
    return Path(layout.embedding_shard(record["clip_id"], record["source"], 0))


def as_version_1(path, **write_options) -> None:
    """Rewrite an embedding file as unclip wrote it before: ``fixed_size_list<float16>[D]``
    vectors, pipeline version 1."""
    t = pq.read_table(path)
    for name in EMBEDDING_COLUMNS:
        x = vectors_to_numpy(t.column(name)).astype(np.float16)
        listed = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
        t = t.set_column(t.schema.get_field_index(name), name, listed)
    meta = {**t.schema.metadata, b"unclip.pipeline_version": b"1"}
    pq.write_table(t.replace_schema_metadata(meta), path, **write_options)


def _docs_sql(marker: str) -> str:
    """The ```sql block of docs/embeddings.md that holds ``marker``."""
    doc = (Path(__file__).parents[2] / "docs" / "embeddings.md").read_text()
    blocks = doc.split("```sql\n")[1:]
    return next(b.split("```")[0] for b in blocks if marker in b)


def test_duckdb_polars_and_pandas_read_the_embedding_file_as_the_docs_say(tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl

    path = _written_file(tmp_path)
    t = pq.read_table(path)
    want = vectors_to_numpy(t.column("image_embedding"))
    con = duckdb.connect()
    con.execute(_docs_sql("CREATE MACRO f16_vector"))
    query = _docs_sql("f16_vector(image_embedding)").replace("embeddings/*/*/*.parquet", str(path))
    rows = con.sql(query.replace("WHERE clip_score > 0.3", "ORDER BY key")).fetchall()
    assert [r[1] for r in rows] == t.column("caption").to_pylist()
    np.testing.assert_array_equal(np.array([r[3] for r in rows], np.float32), want)
    frame = pl.read_parquet(path).select(
        pl.col("image_embedding").bin.reinterpret(dtype=pl.Array(pl.Float16, D))
    )
    np.testing.assert_array_equal(frame["image_embedding"].to_numpy().astype(np.float32), want)
    pdf = pd.read_parquet(path)
    got = np.stack([np.frombuffer(b, "<f2") for b in pdf["image_embedding"]])
    np.testing.assert_array_equal(got.astype(np.float32), want)


def test_embedding_columns_take_two_bytes_per_dimension(tmp_path):
    path = _written_file(tmp_path, rows=2048, dim=512)
    md = pq.ParquetFile(path).metadata
    rg = md.row_group(0)
    vec = [rg.column(i) for i in range(rg.num_columns)]
    vec = [c.total_compressed_size for c in vec if c.path_in_schema in EMBEDDING_COLUMNS]
    assert len(vec) == 2 and sum(vec) / (2 * md.num_rows * 512) <= 2.01


def test_vectors_are_written_uncompressed_and_every_other_leaf_zstd(tmp_path):
    rows = 5
    vectors = np.eye(rows, D, dtype=np.float16)
    nested = pa.table({"tags": [["a", "b"]] * rows, "size": pa.array(range(rows), pa.int32())})
    table = embedding_table(
        [f"k{i}" for i in range(rows)],
        ["a caption"] * rows,
        pa.array(["http://x"] * rows),
        vectors,
        vectors,
        np.ones(rows, np.float32),
        nested,
    )
    path = tmp_path / "e.parquet"
    with open(path, "wb") as f:
        write_embedding_table(table, f)
    rg = pq.ParquetFile(path).metadata.row_group(0)
    codecs = {rg.column(i).path_in_schema: rg.column(i).compression for i in range(rg.num_columns)}
    assert codecs == {
        **dict.fromkeys(
            ["key", "caption", "url", "clip_score", "tags.list.element", "size"], "ZSTD"
        ),
        "image_embedding": "UNCOMPRESSED",
        "text_embedding": "UNCOMPRESSED",
    }
    assert pq.read_table(path).equals(table)


@pytest.mark.parametrize("encoding", ["PLAIN", "BYTE_STREAM_SPLIT"])
def test_files_of_the_fixed_size_list_layout_read_the_same(tmp_path, encoding):
    """A store written before (list vectors, PLAIN + snappy or byte-stream-split + zstd), partly
    rewritten by this unclip, reads as one."""
    layout = StorageLayout(str(tmp_path / "store"))
    src = tmp_path / "src"
    write_clip_retrieval(str(src), [9, 7], D, seed=4)
    record = import_embeddings(layout, _spec(src))
    manifest = assemble_manifest(layout, record["clip_id"], [record["source"]])
    now = load_embeddings(layout, manifest, "all", 0.0)
    leaves = {f"{c}.list.element": encoding for c in EMBEDDING_COLUMNS}
    for s in record["shards"][::2]:
        path = layout.embedding_shard(record["clip_id"], record["source"], s["shard"])
        as_version_1(path, column_encoding=leaves, compression="zstd", use_dictionary=["key"])
        assert check_embedding_schema(path, pq.read_schema(path), record["clip_id"], D) == D
    again = assemble_manifest(layout, record["clip_id"], [record["source"]])
    before = load_embeddings(layout, again, "all", 0.0)
    np.testing.assert_array_equal(before.image, now.image)
    np.testing.assert_array_equal(before.text, now.text)
    assert before.captions == now.captions
    batches = _prior_batches(EmbeddingSource(layout, again, "all", 0.0), batch=4)
    assert len({k for b in batches for k in b["key"]}) == 16  # the training stream too
