"""Embedding on Ray Data: schema, normalisation, float16, only missing shards, key joins."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unclip.datasets.clip import encode_texts, load_clip
from unclip.datasets.config import EmbedConfig
from unclip.datasets.embed import embed_shard, embed_source, pending_shards
from unclip.datasets.ingest import shard_parquet_path
from unclip.datasets.readers import fixed_list_to_numpy


def test_embed_source_schema_norms_and_skip(ray_local, shapes_store, tiny_clip_cfg):
    layout, src = shapes_store.layout, shapes_store.source
    shutil.rmtree(Path(layout.root) / "embeddings")
    assert pending_shards(layout, shapes_store.clip_id, src) == [0, 1]
    cfg = EmbedConfig(batch_size=8, num_actors=2)
    result = embed_source(layout, src, tiny_clip_cfg, shapes_store.clip_checkpoint, cfg)
    assert (result.shards_written, result.shards_skipped, result.samples) == (2, 0, 40)
    assert result.clip_id == shapes_store.clip_id

    path = layout.embedding_shard(result.clip_id, src, 0)
    t = pq.read_table(path)
    assert t.num_rows == 20
    assert t.schema.field("key").type == pa.string()
    assert t.schema.field("caption").type == pa.string()
    assert t.schema.field("url").type == pa.string()
    assert t.schema.field("image_embedding").type == pa.list_(pa.float16(), 32)
    assert t.schema.field("text_embedding").type == pa.list_(pa.float16(), 32)
    assert t.schema.field("clip_score").type == pa.float32()
    assert {"color", "shape", "width", "sha256"} <= set(t.column_names)
    assert "status" not in t.column_names
    meta = t.schema.metadata
    assert meta[b"unclip.clip_id"].decode() == result.clip_id
    assert meta[b"unclip.embedding_dim"] == b"32"
    assert json.loads(meta[b"unclip.identity"])["weights_sha256"]

    img = fixed_list_to_numpy(t.column("image_embedding"))
    txt = fixed_list_to_numpy(t.column("text_embedding"))
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1, atol=2e-3)
    np.testing.assert_allclose(t.column("clip_score").to_numpy(), (img * txt).sum(1), atol=2e-3)
    bundle = load_clip(tiny_clip_cfg, shapes_store.clip_checkpoint)
    captions = t.column("caption").to_pylist()
    np.testing.assert_allclose(txt, encode_texts(bundle, captions), atol=2e-3)
    assert all(
        c == f"a {co} {sh}"
        for c, co, sh in zip(captions, t["color"].to_pylist(), t["shape"].to_pylist(), strict=True)
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
