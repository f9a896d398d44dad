"""Embedding on Ray Data: schema, normalisation, float16, only missing shards, key joins."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unclip.datasets.clip import encode_texts, load_clip
from unclip.datasets.clip_preprocess import tokenize_captions
from unclip.datasets.config import EmbedConfig
from unclip.datasets.embed import embed_shard, embed_source
from unclip.datasets.embed_encode import cached_clip, encode_arrays
from unclip.datasets.embedding_file import vector_type
from unclip.datasets.embedding_shards import pending_shards
from unclip.datasets.ingest import shard_parquet_path
from unclip.datasets.readers import vectors_to_numpy
from unclip.datasets.synthetic import shape_caption


@pytest.mark.parametrize("pipeline", ["fused", "split"])
def test_embed_source_schema_norms_and_skip(
    ray_local, shapes_store, tiny_clip_cfg, pipeline, caplog
):
    layout, src = shapes_store.layout, shapes_store.source
    in_process = [
        pq.read_table(layout.embedding_shard(shapes_store.clip_id, src, s)) for s in (0, 1)
    ]
    shutil.rmtree(Path(layout.root) / "embeddings")
    assert pending_shards(layout, shapes_store.clip_id, src) == [0, 1]
    cfg = EmbedConfig(batch_size=8, num_actors=1, torch_threads=1, pipeline=pipeline)
    with caplog.at_level(logging.INFO, logger="unclip.datasets.embed"):
        result = embed_source(layout, src, tiny_clip_cfg, shapes_store.clip_checkpoint, cfg)
    assert (result.shards_written, result.shards_skipped, result.samples) == (2, 0, 40)
    progress = [
        r.getMessage().split(", ") for r in caplog.records if r.name == "unclip.datasets.embed"
    ]
    assert [p[0] for p in progress] == [f"embed {src}: {i}/2 shards done" for i in (1, 2)]
    assert progress[-1][1] == "40 images" and float(progress[-1][2].split()[0]) > 0
    assert result.clip_id == shapes_store.clip_id

    path = layout.embedding_shard(result.clip_id, src, 0)
    t = pq.read_table(path)
    assert t.num_rows == 20
    assert t.schema.field("key").type == pa.string()
    assert t.schema.field("caption").type == pa.string()
    assert t.schema.field("url").type == pa.string()
    assert t.schema.field("image_embedding").type == vector_type(32)
    assert t.schema.field("text_embedding").type == vector_type(32)
    assert t.schema.field("clip_score").type == pa.float32()
    assert {"color", "shape", "width", "sha256"} <= set(t.column_names)
    assert "status" not in t.column_names
    meta = t.schema.metadata
    assert meta[b"unclip.clip_id"].decode() == result.clip_id
    assert meta[b"unclip.embedding_dim"] == b"32"
    assert json.loads(meta[b"unclip.identity"])["weights_sha256"]

    img = vectors_to_numpy(t.column("image_embedding"))
    txt = vectors_to_numpy(t.column("text_embedding"))
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1, atol=2e-3)
    np.testing.assert_allclose(t.column("clip_score").to_numpy(), (img * txt).sum(1), atol=2e-3)
    bundle = load_clip(tiny_clip_cfg, shapes_store.clip_checkpoint)
    captions = t.column("caption").to_pylist()
    np.testing.assert_allclose(txt, encode_texts(bundle, captions), atol=2e-3)
    assert all(
        c == shape_caption(co, sh)
        for c, co, sh in zip(captions, t["color"].to_pylist(), t["shape"].to_pylist(), strict=True)
    )

    # Ray Data tasks (fused, or decode tasks feeding encoders) and the driver's writer give
    # what one process gives.
    for shard, expected in zip((0, 1), in_process, strict=True):
        got = pq.read_table(layout.embedding_shard(result.clip_id, src, shard))
        assert got.column_names == expected.column_names
        assert got.drop(["image_embedding", "text_embedding", "clip_score"]).equals(
            expected.drop(["image_embedding", "text_embedding", "clip_score"])
        )
        for col in ("image_embedding", "text_embedding"):
            np.testing.assert_allclose(
                vectors_to_numpy(got[col]), vectors_to_numpy(expected[col]), atol=1e-3
            )

    mtime = Path(path).stat().st_mtime_ns
    again = embed_source(layout, src, tiny_clip_cfg, shapes_store.clip_checkpoint, cfg)
    assert (again.shards_written, again.shards_skipped) == (0, 2)
    assert Path(path).stat().st_mtime_ns == mtime
    assert identity_written(layout, result.clip_id)


def identity_written(layout, clip_id: str) -> bool:
    return Path(layout.clip_dir(clip_id), "identity.json").is_file()


def test_key_in_tar_but_not_in_metadata_is_counted_and_skipped(shapes_store, tiny_clip_cfg):
    layout, src = shapes_store.layout, shapes_store.source
    meta_path = shard_parquet_path(layout, src, 1)
    meta = pq.read_table(meta_path)
    dropped = meta.column("key")[0].as_py()
    pq.write_table(meta.slice(1), meta_path)
    Path(layout.embedding_shard(shapes_store.clip_id, src, 1)).unlink()
    bundle = load_clip(tiny_clip_cfg, shapes_store.clip_checkpoint)
    counts = embed_shard(layout, bundle, src, 1, batch_size=7)
    assert counts["written"] == 1 and counts["samples"] == 19 and counts["not_in_metadata"] == 1
    keys = pq.read_table(layout.embedding_shard(bundle.clip_id, src, 1)).column("key").to_pylist()
    assert dropped not in keys and len(keys) == 19


def _rewrite_tar(path: Path, change) -> None:
    """Rewrite a tar member by member; ``change(name, data)`` returns new bytes or None to drop."""
    members = []
    with tarfile.open(path) as tar:
        for info in tar:
            members.append((info.name, tar.extractfile(info).read()))
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            data = change(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_corrupt_tar_members_are_counted_and_skipped(shapes_store, tiny_clip_cfg):
    layout, src = shapes_store.layout, shapes_store.source
    tar = Path(layout.image_shard(src, 1))
    names = sorted(n for n in tarfile.open(tar).getnames() if n.endswith(".jpg"))
    bad_key = names[3].split(".")[0]
    _rewrite_tar(tar, lambda n, d: b"not a jpeg" if n == names[3] else d)
    Path(layout.embedding_shard(shapes_store.clip_id, src, 1)).unlink()
    bundle = load_clip(tiny_clip_cfg, shapes_store.clip_checkpoint)
    counts = embed_shard(layout, bundle, src, 1, batch_size=8)
    assert counts == {
        "written": 1,
        "samples": 19,
        "corrupt": 1,
        "truncated_tar": 0,
        "not_in_metadata": 0,
    }
    keys = pq.read_table(layout.embedding_shard(bundle.clip_id, src, 1)).column("key").to_pylist()
    assert bad_key not in keys and len(keys) == 19


def test_shard_with_no_readable_sample_gets_an_empty_file(shapes_store, tiny_clip_cfg):
    layout, src = shapes_store.layout, shapes_store.source
    _rewrite_tar(
        Path(layout.image_shard(src, 1)), lambda n, d: b"broken" if n.endswith(".jpg") else d
    )
    Path(layout.embedding_shard(shapes_store.clip_id, src, 1)).unlink()
    bundle = load_clip(tiny_clip_cfg, shapes_store.clip_checkpoint)
    counts = embed_shard(layout, bundle, src, 1, batch_size=8)
    assert (counts["samples"], counts["corrupt"]) == (0, 20)
    t = pq.read_table(layout.embedding_shard(bundle.clip_id, src, 1))
    assert t.num_rows == 0 and t.schema.field("image_embedding").type == vector_type(32)
    assert pending_shards(layout, bundle.clip_id, src) == []  # done: not retried every run


def test_truncated_embedding_file_is_embedded_again(shapes_store, tiny_clip_cfg):
    layout, src, clip_id = shapes_store.layout, shapes_store.source, shapes_store.clip_id
    path = Path(layout.embedding_shard(clip_id, src, 1))
    good = pq.read_table(path)
    path.write_bytes(path.read_bytes()[:-50])  # a writer killed elsewhere (no atomic rename)
    assert pending_shards(layout, clip_id, src) == [1]
    bundle = load_clip(tiny_clip_cfg, shapes_store.clip_checkpoint)
    assert embed_shard(layout, bundle, src, 1, batch_size=16)["written"] == 1
    assert pq.read_table(path).equals(good)
    assert pending_shards(layout, clip_id, src) == []


def test_file_of_another_clip_in_the_folder_is_an_error(shapes_store, tiny_clip_cfg):
    layout, src, clip_id = shapes_store.layout, shapes_store.source, shapes_store.clip_id
    path = Path(layout.embedding_shard(clip_id, src, 0))
    t = pq.read_table(path)
    meta = {**t.schema.metadata, b"unclip.clip_id": b"another-clip"}
    pq.write_table(t.replace_schema_metadata(meta), path)
    with pytest.raises(ValueError, match="written by CLIP 'another-clip'") as e:
        pending_shards(layout, clip_id, src)
    assert str(path) in str(e.value)
    bundle = load_clip(tiny_clip_cfg, shapes_store.clip_checkpoint)
    with pytest.raises(ValueError, match="another-clip"):
        embed_shard(layout, bundle, src, 0, batch_size=16)
    assert pq.read_table(path).schema.metadata[b"unclip.clip_id"] == b"another-clip"  # untouched


def test_file_size_is_near_two_bytes_per_dimension(shapes_store):
    """float16 vectors, PLAIN and uncompressed: the embedding columns take 2 B / dim."""
    path = shapes_store.layout.embedding_shard(shapes_store.clip_id, shapes_store.source, 0)
    md = pq.ParquetFile(path).metadata
    rg = md.row_group(0)
    sizes = {
        rg.column(i).path_in_schema: rg.column(i).total_compressed_size
        for i in range(rg.num_columns)
    }
    emb = sizes["image_embedding"] + sizes["text_embedding"]
    assert md.num_row_groups == 1
    assert emb / (2 * md.num_rows * 32) < 2.05


def test_cached_clip_loads_once_per_process_and_refuses_another_clip(shapes_store, tiny_clip_cfg):
    ckpt, clip_id = shapes_store.clip_checkpoint, shapes_store.clip_id
    first = cached_clip(tiny_clip_cfg, ckpt, "cpu", clip_id)
    assert cached_clip(tiny_clip_cfg, ckpt, "cpu", clip_id) is first  # kept, not reloaded
    with pytest.raises(RuntimeError, match="the embed run started with"):
        cached_clip(tiny_clip_cfg, ckpt, "cpu", "another-clip-id")  # checkpoint changed under us


def test_caption_dedup_gives_what_encoding_every_caption_gives(shapes_store, tiny_clip_cfg):
    bundle = load_clip(tiny_clip_cfg, shapes_store.clip_checkpoint)
    captions = ["a red circle", "a blue square", "a red circle", "a green triangle", "a red circle"]
    tokens = tokenize_captions(bundle.tokenizer, captions, dedup=True)
    np.testing.assert_array_equal(tokens, np.asarray(bundle.tokenizer(captions)))
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((5, 3, 32, 32)).astype(np.float32)
    for rows in ([0, 1, 2, 3, 4], [1, 3, 0], [4]):  # repeats; all distinct (unique() sorts); one
        ie, te = encode_arrays(bundle, pixels[rows], tokens[rows], dedup_captions=True)
        ie0, te0 = encode_arrays(bundle, pixels[rows], tokens[rows], dedup_captions=False)
        np.testing.assert_array_equal(ie, ie0)
        np.testing.assert_allclose(te, te0, atol=1e-6)
        np.testing.assert_allclose(te, encode_texts(bundle, [captions[i] for i in rows]), atol=1e-5)

    layout, src, clip_id = shapes_store.layout, shapes_store.source, shapes_store.clip_id
    path = Path(layout.embedding_shard(clip_id, src, 0))
    deduped = pq.read_table(path)  # the fixture's, dedup on (20 samples, 18 distinct captions)
    assert len(set(deduped["caption"].to_pylist())) < deduped.num_rows
    path.unlink()
    assert embed_shard(layout, bundle, src, 0, batch_size=16, dedup_captions=False)["written"]
    every = pq.read_table(path)
    assert every.drop(["text_embedding", "clip_score"]).equals(
        deduped.drop(["text_embedding", "clip_score"])
    )
    np.testing.assert_allclose(
        vectors_to_numpy(every["text_embedding"]),
        vectors_to_numpy(deduped["text_embedding"]),
        atol=1e-3,
    )


def test_pipeline_choice():
    assert EmbedConfig().fused and not EmbedConfig(device="cuda").fused
    assert not EmbedConfig(pipeline="split").fused
    with pytest.raises(ValueError, match="CPU only"):
        EmbedConfig(device="cuda", pipeline="fused")
