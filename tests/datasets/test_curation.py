"""Curation in the manifest: removal lists honoured by every reader, recipes and heads as versions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from unclip.datasets.config import FilterRecipe, ManifestConfig, ScoreFilter, SemanticDedupConfig
from unclip.datasets.embedding_export import export_embeddings
from unclip.datasets.embedding_file import vectors_to_numpy
from unclip.datasets.manifest import assemble_manifest
from unclip.datasets.readers import (
    holdout_captions,
    load_embeddings,
    load_image_pairs,
    load_images_captions,
)
from unclip.datasets.recipes import format_kept_table
from unclip.datasets.scores import load_head
from unclip.datasets.semantic_dedup import curate, removed_keys
from unclip.datasets.stream import StreamStats
from unclip.datasets.stream_sources import (
    EmbeddingSource,
    ImagePairSource,
    IngestedImageSource,
    manifest_counts,
)


def _embeddings(store) -> tuple[list[str], np.ndarray, list[str]]:
    keys, xs, captions = [], [], []
    for shard in store.shards:
        t = pq.read_table(store.layout.embedding_shard(store.clip_id, store.source, shard))
        keys += [f"{store.source}/{k}" for k in t.column("key").to_pylist()]
        captions += t.column("caption").to_pylist()
        xs.append(vectors_to_numpy(t.column("image_embedding")))
    return keys, np.concatenate(xs), captions


def _dedup(store) -> set[str]:
    _, x, _ = _embeddings(store)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = (x @ x.T)[np.triu_indices(len(x), 1)]
    cfg = SemanticDedupConfig(similarity=float(np.quantile(sims, 0.97)), cluster_size=10)
    curate(store.layout, store.clip_id, [store.source], cfg)
    removed = removed_keys(store.layout, store.clip_id)
    assert 0 < len(removed) < 40
    return removed


def _scores(store, shard: int) -> np.ndarray:
    path = store.layout.embedding_shard(store.clip_id, store.source, shard)
    return pq.read_table(path, columns=["clip_score"]).column("clip_score").to_numpy()


def _stream_keys(source) -> set[str]:
    stats, out = StreamStats(), set()
    for i, shard in enumerate(source.shards):
        rows = source.read(i, 0, shard.count, stats)
        name = shard.name.split("/")[0]
        out.update(f"{name}/{r[0]}" for r in rows)
    return out


def test_every_reader_leaves_out_the_removal_lists(shapes_store, tmp_path):
    store, layout = shapes_store, shapes_store.layout
    removed = _dedup(store)
    everything = set(_embeddings(store)[0])
    m = assemble_manifest(
        layout, store.clip_id, [store.source], ManifestConfig(semantic_dedup=True)
    )
    want = everything - removed
    assert m["num_samples"] == len(want) and m["curation"]["semantic_dedup"]
    assert set(load_embeddings(layout, m, "all", 0.0).keys) == want
    assert set(load_image_pairs(layout, m, "all", 0.0).keys) == want
    assert sum(manifest_counts(layout, m, "all", 0.0)) == len(want)
    assert _stream_keys(EmbeddingSource(layout, m, "all", 0.0)) == want
    assert _stream_keys(ImagePairSource(layout, m, "all", 0.0, image_size=32)) == want
    # the bootstrap CLIP's readers, before embeddings: given the removal lists' keys
    boot = IngestedImageSource(layout, [store.source], "all", 0.0, 32, removed=frozenset(removed))
    assert _stream_keys(boot) == want
    assert set(load_images_captions(layout, [store.source], "all", 0.0, 32, removed).keys) == want
    # the evaluation's hold-out captions and the clip-retrieval export read the same rows
    served_captions = set(load_embeddings(layout, m, "all", 0.0).captions)
    assert set(holdout_captions(layout, m, 1.0, 10_000)) == served_captions
    export_embeddings(layout, m["version"], str(tmp_path / "export"))
    exported = pq.read_table(tmp_path / "export" / "metadata").column("key").to_pylist()
    assert {f"{store.source}/{k}" for k in exported} == want
    # the embedding statistics are over the served rows only
    stats = np.load(layout.embedding_stats(m["version"]))
    served = load_embeddings(layout, m, "all", 0.0)
    np.testing.assert_allclose(stats["image_mean"], served.image.mean(0), atol=1e-4)
    plain = assemble_manifest(layout, store.clip_id, [store.source])
    assert plain["version"] != m["version"] and plain["num_samples"] == 40


def test_a_changed_removal_list_changes_the_dataset_version(shapes_store):
    store, layout = shapes_store, shapes_store.layout
    held = Path(layout.embedding_shard(store.clip_id, store.source, 1))
    data = held.read_bytes()
    held.unlink()
    _, x, _ = _embeddings_of(store, [0])
    cfg = SemanticDedupConfig(similarity=0.999999, cluster_size=10)
    curate(layout, store.clip_id, [store.source], cfg)
    before = assemble_manifest(
        layout, store.clip_id, [store.source], ManifestConfig(semantic_dedup=True)
    )
    held.write_bytes(data)
    # the new shard is not curated yet: the manifest leaves it out rather than serve it unchecked
    same = assemble_manifest(
        layout, store.clip_id, [store.source], ManifestConfig(semantic_dedup=True)
    )
    assert same["version"] == before["version"]
    curate(layout, store.clip_id, [store.source], cfg)
    after = assemble_manifest(
        layout, store.clip_id, [store.source], ManifestConfig(semantic_dedup=True)
    )
    assert after["version"] != before["version"] and len(after["shards"]) == 2


def _embeddings_of(store, shards):
    sub = type(store)(
        store.root, store.layout, store.source, store.clip_checkpoint, store.clip_id, shards
    )
    return _embeddings(sub)


def _train_head(x: np.ndarray, y: np.ndarray, path: Path) -> None:
    """Logistic regression by gradient descent, saved as a one-layer head."""
    w, b = np.zeros((x.shape[1], 1)), np.zeros(1)
    weight = np.where(y > 0, 0.5 / y.mean(), 0.5 / (1 - y.mean()))  # balanced classes
    for _ in range(3000):
        p = 1 / (1 + np.exp(-(x @ w + b)))
        g = (p[:, 0] - y) * weight
        w -= 2.0 * (x.T @ g[:, None]) / len(y)
        b -= 2.0 * g.mean()
    np.savez(path, w0=w.astype(np.float32), b0=b.astype(np.float32))


def test_recipes_and_a_trained_head_give_their_own_versions_and_reports(shapes_store, tmp_path):
    store, layout = shapes_store, shapes_store.layout
    keys, x, captions = _embeddings(store)
    y = np.array(["red" in c for c in captions], float)
    assert 0 < y.sum() < len(y)
    head_path = tmp_path / "red.npz"
    _train_head(x, y, head_path)
    head = load_head(str(head_path), x.shape[1])
    logits = head(x)
    hit = logits > 0
    assert hit[y > 0].mean() > 0.8 and (~hit[y == 0]).mean() > 0.8  # it learned the colour
    longest = max(len(c.strip()) for c in captions)
    assert min(len(c.strip()) for c in captions) < longest
    recipes = {
        "top30": FilterRecipe(scores=[ScoreFilter(score="clip_score", top_fraction=0.3)]),
        "red": FilterRecipe(scores=[ScoreFilter(score="head:red", min=0.0)]),
        "long_captions": FilterRecipe(caption_min_chars=longest),
    }
    versions = {}
    for name in [None, *recipes]:
        cfg = ManifestConfig(recipes=recipes, recipe=name, heads={"red": str(head_path)})
        m = assemble_manifest(layout, store.clip_id, [store.source], cfg)
        versions[name] = m["version"]
        served = set(load_embeddings(layout, m, "all", 0.0).keys)
        if name == "red":
            assert served == {k for k, v in zip(keys, logits, strict=True) if v >= 0}
        if name == "top30":  # DataComp's rule: the top 30 % of the pool, ties at the cutoff kept
            scores = np.concatenate([_scores(store, s) for s in store.shards])
            cutoff = np.sort(scores)[::-1][int(np.ceil(0.3 * len(scores))) - 1]
            assert m["num_samples"] == int((scores >= cutoff).sum()) < len(scores)
        if name == "long_captions":
            assert served == {
                k for k, c in zip(keys, captions, strict=True) if len(c.strip()) >= longest
            }
        if name is not None:
            report = json.loads(Path(layout.manifest_filter_report(m["version"])).read_text())
            assert set(report["partitions"]) == {f"{store.source}/00000", f"{store.source}/00001"}
            for row in report["partitions"].values():
                assert 0 <= row["kept"] <= 1
            assert "kept" in format_kept_table(report["partitions"])
        again = assemble_manifest(layout, store.clip_id, [store.source], cfg)
        assert again["version"] == m["version"]
    assert len(set(versions.values())) == 4
    # another head file under the same name is another version
    _train_head(x, 1 - y, head_path)
    cfg = ManifestConfig(recipes=recipes, recipe="red", heads={"red": str(head_path)})
    assert (
        assemble_manifest(layout, store.clip_id, [store.source], cfg)["version"] != versions["red"]
    )


def test_a_bad_head_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, w0=np.zeros((8, 4), np.float32), b0=np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"bad\.npz.*one output"):
        load_head(str(path), 8)
    with pytest.raises(ValueError, match=r"bad\.npz.*w0"):
        load_head(str(path), 16)


def test_a_recipe_naming_an_unknown_head_is_a_config_error():
    with pytest.raises(ValueError, match="names no head"):
        ManifestConfig(recipes={"x": FilterRecipe(scores=[ScoreFilter(score="head:nope", min=0)])})
