"""The dataset manifest: stable versions, new versions on new content, stats, CLIP-score filter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unclip.datasets.clip import load_clip
from unclip.datasets.config import ManifestConfig
from unclip.datasets.embed import embed_shard
from unclip.datasets.embedding_file import vector_array, vectors_to_numpy
from unclip.datasets.manifest import _Moments, assemble_manifest, latest_manifest
from unclip.datasets.readers import load_embedding_stats, load_embeddings, load_image_pairs


def test_version_is_stable_and_files_written_once(shapes_store):
    layout, src, clip_id = shapes_store.layout, shapes_store.source, shapes_store.clip_id
    m = assemble_manifest(layout, clip_id, [src])
    assert m["clip_id"] == clip_id and m["embedding_dim"] == 32 and m["num_samples"] == 40
    assert [(s["source"], s["shard"], s["count"]) for s in m["shards"]] == [
        (src, 0, 20),
        (src, 1, 20),
    ]
    for s in m["shards"]:
        assert (
            Path(layout.join(s["images"])).is_file()
            and Path(layout.join(s["embeddings"])).is_file()
        )
        assert len(s["sha256"]) == 64
        # what an unfiltered shard entry holds is hashed into the version: no more, no less
        assert set(s) == {"source", "shard", "images", "embeddings", "count", "sha256"}
    path = Path(layout.manifest(m["version"]))
    pointer = Path(layout.latest_manifest_pointer())
    mtime, data = path.stat().st_mtime_ns, path.read_bytes()
    pointed = pointer.stat().st_mtime_ns
    again = assemble_manifest(layout, clip_id, [src, src])
    assert again == m and path.stat().st_mtime_ns == mtime and path.read_bytes() == data
    assert pointer.stat().st_mtime_ns == pointed  # nothing written when nothing changed
    assert latest_manifest(layout) == m

    stats = load_embedding_stats(layout, m)
    emb = load_embeddings(layout, m, "all", 0.0)
    assert set(stats) == {"image_mean", "image_std", "text_mean", "text_std"}
    for k in stats:
        assert stats[k].dtype == np.float32 and stats[k].shape == (32,)
    np.testing.assert_allclose(stats["image_mean"], emb.image.mean(0), atol=1e-4)
    np.testing.assert_allclose(stats["text_std"], emb.text.std(0), atol=1e-4)


def test_the_version_is_the_documented_hash_of_clip_shards_and_filter(shapes_store):
    import hashlib
    import json

    layout, src, clip_id = shapes_store.layout, shapes_store.source, shapes_store.clip_id
    for cfg in (None, ManifestConfig(clip_score_top_fraction=0.5)):
        m = assemble_manifest(layout, clip_id, [src], cfg)
        content = {"clip_id": clip_id, "shards": m["shards"]}
        if "clip_score_min" in m:
            content["clip_score_min"] = m["clip_score_min"]
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
        assert m["version"] == digest[:16]
        assert ("clip_score_min" in m) == (cfg is not None)


def test_new_shard_gives_new_version(shapes_store, tiny_clip_cfg, caplog):
    layout, src, clip_id = shapes_store.layout, shapes_store.source, shapes_store.clip_id
    emb1 = Path(layout.embedding_shard(clip_id, src, 1))
    emb1.unlink()
    with caplog.at_level("WARNING", logger="unclip.datasets.manifest"):
        m1 = assemble_manifest(layout, clip_id, [src])
    assert f"{src}/00001" in caplog.text and "left out" in caplog.text
    caplog.clear()
    assert [s["shard"] for s in m1["shards"]] == [0] and m1["num_samples"] == 20
    embed_shard(layout, load_clip(tiny_clip_cfg, shapes_store.clip_checkpoint), src, 1, 16)
    with caplog.at_level("WARNING", logger="unclip.datasets.manifest"):
        m2 = assemble_manifest(layout, clip_id, [src])
    assert "left out" not in caplog.text  # every shard embedded: nothing to warn about
    assert m2["version"] != m1["version"] and m2["num_samples"] == 40
    assert latest_manifest(layout)["version"] == m2["version"]
    assert Path(layout.manifest(m1["version"])).is_file()  # old versions stay readable


def test_no_embeddings_or_a_truncated_file_is_an_error(shapes_store):
    layout, src, clip_id = shapes_store.layout, shapes_store.source, shapes_store.clip_id
    with pytest.raises(ValueError, match="no shards with embeddings"):
        assemble_manifest(layout, "0" * 16, [src])
    emb = Path(layout.embedding_shard(clip_id, src, 1))
    emb.write_bytes(emb.read_bytes()[:300])
    with pytest.raises(ValueError, match="unreadable embedding Parquet") as e:
        assemble_manifest(layout, clip_id, [src])
    assert str(emb) in str(e.value)


def test_any_fsspec_root(shapes_store, tiny_clip_cfg):
    """The same manifest and readers on a memory:// root (local paths are not assumed)."""
    import fsspec

    from unclip.datasets.clip import load_clip, save_clip
    from unclip.datasets.readers import load_image_pairs
    from unclip.datasets.storage import StorageLayout

    mem = fsspec.filesystem("memory")
    for p in Path(shapes_store.root).rglob("*"):
        if p.is_file() and "embeddings" not in p.parts and "clip" not in p.parts:
            mem.pipe(f"/unclip-test/{p.relative_to(shapes_store.root)}", p.read_bytes())
    layout = StorageLayout("memory://unclip-test")
    bundle = load_clip(tiny_clip_cfg, shapes_store.clip_checkpoint)
    remote_ckpt = save_clip(bundle.model, tiny_clip_cfg, layout.join("clip", "boot"))
    assert load_clip(tiny_clip_cfg, remote_ckpt).clip_id == bundle.clip_id
    for shard in shapes_store.shards:
        embed_shard(layout, bundle, shapes_store.source, shard, 16)
    m = assemble_manifest(layout, bundle.clip_id, [shapes_store.source])
    local = assemble_manifest(shapes_store.layout, bundle.clip_id, [shapes_store.source])
    assert m["version"] == local["version"]
    assert load_image_pairs(layout, m, "all", 0.1).images.shape == (40, 32, 32, 3)
    mem.rm("/unclip-test", recursive=True)


def test_clip_score_filter_shapes_the_manifest_not_the_files(shapes_store):
    layout, src, clip_id = shapes_store.layout, shapes_store.source, shapes_store.clip_id
    files = {p: p.read_bytes() for p in Path(layout.root, "embeddings").rglob("*.parquet")}
    plain = assemble_manifest(layout, clip_id, [src])
    scores = np.sort(load_embeddings_scores(layout, plain))
    threshold = float(scores[25])  # keeps the 15 highest (scores are distinct here)

    by_min = assemble_manifest(layout, clip_id, [src], ManifestConfig(clip_score_min=threshold))
    assert by_min["version"] != plain["version"] and by_min["num_samples"] == 15
    assert by_min["clip_score_min"] == threshold
    assert [s["rows"] for s in by_min["shards"]] == [20, 20]
    assert sum(s["count"] for s in by_min["shards"]) == 15
    emb = load_embeddings(layout, by_min, "all", 0.0)
    assert len(emb.keys) == 15
    kept = set(emb.keys)
    every = load_embeddings(layout, plain, "all", 0.0)
    assert kept < set(every.keys)
    stats = load_embedding_stats(layout, by_min)
    np.testing.assert_allclose(stats["image_mean"], emb.image.mean(0), atol=1e-4)
    pairs = load_image_pairs(layout, by_min, "all", 0.0)
    assert set(pairs.keys) == kept
    assert pairs.skipped["clip_score_filtered"] == 25 and pairs.skipped["not_in_embeddings"] == 0

    # DataComp-style: the top fraction; resolving to the same threshold is the same version.
    top = assemble_manifest(layout, clip_id, [src], ManifestConfig(clip_score_top_fraction=15 / 40))
    assert top["version"] == by_min["version"] and top["clip_score_min"] == threshold
    both = ManifestConfig(clip_score_min=float(scores[30]), clip_score_top_fraction=0.5)
    assert assemble_manifest(layout, clip_id, [src], both)["num_samples"] == 10

    # A filter that keeps everything, or none, gives back the unfiltered version and bytes.
    everything = ManifestConfig(clip_score_min=-1.0, clip_score_top_fraction=1.0)
    assert assemble_manifest(layout, clip_id, [src], everything) == plain
    assert assemble_manifest(layout, clip_id, [src]) == plain
    assert latest_manifest(layout) == plain
    assert {p: p.read_bytes() for p in files} == files  # no file rewritten or deleted


def load_embeddings_scores(layout, manifest) -> np.ndarray:
    from unclip.datasets.readers import read_embedding_table

    return np.concatenate(
        [
            read_embedding_table(layout, e, columns=["clip_score"])["clip_score"].to_numpy()
            for e in manifest["shards"]
        ]
    )


def test_filtered_manifest_detects_a_changed_count(shapes_store):
    layout, src, clip_id = shapes_store.layout, shapes_store.source, shapes_store.clip_id
    m = assemble_manifest(layout, clip_id, [src], ManifestConfig(clip_score_top_fraction=0.5))
    m["shards"][0]["count"] += 1
    with pytest.raises(ValueError, match="pass the manifest's filter"):
        load_embeddings(layout, m, "all", 0.0)


def test_file_of_another_clip_or_schema_is_an_error(shapes_store):
    layout, src, clip_id = shapes_store.layout, shapes_store.source, shapes_store.clip_id
    path = Path(layout.embedding_shard(clip_id, src, 1))
    t = pq.read_table(path)
    pq.write_table(
        t.replace_schema_metadata({**t.schema.metadata, b"unclip.clip_id": b"other"}), path
    )
    with pytest.raises(ValueError, match="written by CLIP 'other'") as e:
        assemble_manifest(layout, clip_id, [src])
    assert str(path) in str(e.value)

    wide = t.set_column(
        t.schema.get_field_index("image_embedding"),
        "image_embedding",
        pa.FixedSizeListArray.from_arrays(
            pa.array(vectors_to_numpy(t["image_embedding"]).reshape(-1)), 32
        ),
    )
    pq.write_table(wide, path)
    with pytest.raises(
        ValueError,
        match=r"column 'image_embedding' is fixed_size_list<element: float>\[32\], "
        r"expected fixed_size_binary\[64\]",
    ) as e:
        assemble_manifest(layout, clip_id, [src])
    assert str(path) in str(e.value)

    pq.write_table(
        t.replace_schema_metadata({**t.schema.metadata, b"unclip.embedding_dim": b"64"}), path
    )
    with pytest.raises(
        ValueError,
        match=r"column 'image_embedding' is fixed_size_binary\[64\], expected fixed_size_binary\[128\]",
    ):
        assemble_manifest(layout, clip_id, [src])


def test_changed_embeddings_with_the_same_counts_give_a_new_version(shapes_store):
    """Re-embedding a shard (another CLIP run of the same id, a repaired file) is new content."""
    layout, src, clip_id = shapes_store.layout, shapes_store.source, shapes_store.clip_id
    m1 = assemble_manifest(layout, clip_id, [src])
    path = Path(layout.embedding_shard(clip_id, src, 1))
    t = pq.read_table(path)
    col = t.schema.get_field_index("clip_score")
    changed = t.set_column(col, "clip_score", pa.array(t["clip_score"].to_numpy() * 0.5))
    pq.write_table(changed.replace_schema_metadata(t.schema.metadata), path)
    m2 = assemble_manifest(layout, clip_id, [src])
    assert [s["count"] for s in m2["shards"]] == [s["count"] for s in m1["shards"]]
    assert m2["shards"][1]["sha256"] != m1["shards"][1]["sha256"]
    assert m2["shards"][0] == m1["shards"][0]
    assert m2["version"] != m1["version"]
    assert latest_manifest(layout)["version"] == m2["version"]


def test_files_each_valid_but_of_two_dimensions_are_an_error(shapes_store):
    layout, src, clip_id = shapes_store.layout, shapes_store.source, shapes_store.clip_id
    path = Path(layout.embedding_shard(clip_id, src, 1))
    t = pq.read_table(path)
    for name in ("image_embedding", "text_embedding"):
        x = vectors_to_numpy(t[name])
        t = t.set_column(t.schema.get_field_index(name), name, vector_array(np.hstack([x, x])))
    meta = {**t.schema.metadata, b"unclip.embedding_dim": b"64"}
    pq.write_table(t.replace_schema_metadata(meta), path)
    with pytest.raises(ValueError, match=r"embedding files of dimensions \[32, 64\]"):
        assemble_manifest(layout, clip_id, [src])


def test_the_filter_threshold_is_the_kth_largest_score_and_may_be_negative():
    """The rule alone, on scores of any order and sign (an untrained CLIP's are often below 0)."""
    import math

    from unclip.datasets.manifest import _Entry, _threshold

    # Large enough that numpy's partition does not happen to sort the whole array.
    rng = np.random.default_rng(0)
    scores = rng.permutation(np.linspace(-0.9, 0.9, 4000)).astype(np.float32)
    entries = [_Entry("s", i, "p", "h", 4, part) for i, part in enumerate(np.split(scores, 4))]
    ranked = np.sort(scores.astype(np.float64))[::-1]
    for frac in (0.5, 0.13, 0.9, 0.0001):  # the last: under one sample, the best one is kept
        k = math.ceil(frac * len(scores))
        assert _threshold(entries, ManifestConfig(clip_score_top_fraction=frac)) == ranked[k - 1]
    assert _threshold(entries, ManifestConfig(clip_score_top_fraction=1.0)) is None
    assert _threshold(entries, ManifestConfig(clip_score_min=-0.5)) == pytest.approx(-0.5)
    assert _threshold(entries, ManifestConfig(clip_score_min=-1.0)) is None
    assert _threshold(entries, ManifestConfig()) is None


def test_moments_give_the_mean_and_std_of_every_row_added_even_one():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(7, 3)).astype(np.float32)
    one = _Moments()
    one.add(rows[:1])
    mean, std = one.mean_std()
    np.testing.assert_allclose(mean, rows[0], rtol=1e-6)
    np.testing.assert_allclose(std, 0.0, atol=1e-6)
    parts = _Moments()
    for chunk in (rows[:2], rows[2:3], rows[3:]):
        parts.add(chunk)
    mean, std = parts.mean_std()
    assert mean.dtype == std.dtype == np.float32
    np.testing.assert_allclose(mean, rows.astype(np.float64).mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, rows.astype(np.float64).std(0), rtol=1e-5)
