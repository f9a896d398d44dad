"""The kept-member bank of semantic dedup: what it holds, what an incremental run reads of it,
stores of the older layout, object storage."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unclip.datasets import kept_bank, semantic_dedup
from unclip.datasets.config import SemanticDedupConfig
from unclip.datasets.duplicate_groups import assign
from unclip.datasets.embedding_file import vectors_to_numpy
from unclip.datasets.semantic_dedup import curate, read_centroids, read_state
from unclip.datasets.storage import StorageLayout

_spec = importlib.util.spec_from_file_location(
    "bench_stores", Path(__file__).resolve().parents[2] / "benchmarks" / "stores.py"
)
stores = sys.modules["bench_stores"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(
    stores
)  # the benchmarks' store writer: shards as ingest + embed leave them

SOURCE, CLIP, D, ROWS = "keptbanksrc00000", "keptbankclip0000", 32, 40
CFG = SemanticDedupConfig(similarity=0.97, cluster_size=10, keep="first_seen")


def _rows(rng: np.random.Generator, centres: list[int]) -> np.ndarray:
    """ROWS unit rows around ``centres`` of a fixed set."""
    directions = np.random.default_rng(99).normal(size=(8, D))
    x = 3 * directions[rng.choice(centres, ROWS)] + rng.normal(size=(ROWS, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _add(layout: StorageLayout, shard: int, x: np.ndarray) -> None:
    keys = [f"{shard * ROWS + i:06d}" for i in range(len(x))]
    stores.write_shard(layout, shard, keys, D, 0, 0, np.stack([x, x]), SOURCE, CLIP)


def _store(root: str) -> tuple[StorageLayout, np.ndarray]:
    """Partitions 0 (centres 0-3) and 1 (centres 4-7) curated; returns a new partition's rows, all
    near the kept rows of one cluster that only partition 0 holds, a fifth of them near-copies."""
    layout = StorageLayout(root)
    rng = np.random.default_rng(0)
    first = _rows(rng, [0, 1, 2, 3])
    first[1::7] = first[0::7][: len(first[1::7])]  # exact copies inside the partition
    _add(layout, 0, first)
    _add(layout, 1, _rows(rng, [4, 5, 6, 7]))
    curate(layout, CLIP, [SOURCE], CFG)
    kept0, vectors0 = _kept(layout, 0)
    clusters0 = kept0.column("cluster").to_numpy()
    only_first = sorted(set(clusters0) - set(_kept(layout, 1)[0].column("cluster").to_pylist()))
    members = vectors0[clusters0 == only_first[0]].astype(np.float32)
    x = members[rng.integers(len(members), size=ROWS)]
    noise = np.where(np.arange(ROWS)[:, None] % 5 == 0, 0.001, 0.06)
    x = x + noise * rng.normal(size=x.shape)
    return layout, (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _version(layout: StorageLayout) -> str:
    return semantic_dedup.current_version(layout, CLIP)


def _kept(layout: StorageLayout, shard: int) -> tuple[pa.Table, np.ndarray]:
    version = _version(layout)
    table = pq.read_table(layout.semdedup_kept(CLIP, version, SOURCE, shard))
    return table, np.load(kept_bank.kept_vectors_path(layout, CLIP, version, SOURCE, shard))


def _removals(layout: StorageLayout, shard: int) -> bytes:
    return Path(layout.semdedup_removals(CLIP, _version(layout), SOURCE, shard)).read_bytes()


@pytest.fixture
def store(tmp_path) -> tuple[StorageLayout, np.ndarray]:
    return _store(str(tmp_path / "store"))


def test_the_bank_holds_the_kept_rows_as_the_comparison_saw_them(store):
    layout, _ = store
    centroids = read_centroids(layout, CLIP, _version(layout))
    for shard in (0, 1):
        emb = pq.read_table(layout.embedding_shard(CLIP, SOURCE, shard))
        row = {k: i for i, k in enumerate(emb.column("key").to_pylist())}
        x = vectors_to_numpy(emb.column("image_embedding"))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        table, vectors = _kept(layout, shard)
        removals = pq.read_table(layout.semdedup_removals(CLIP, _version(layout), SOURCE, shard))
        removed = set(removals.column("key").to_pylist())
        keys = table.column("key").to_pylist()
        assert set(keys) == set(row) - removed and len(keys) == len(vectors)
        assert removed or shard == 1  # partition 0 holds planted copies
        assert vectors.dtype == np.float16 and vectors.shape[1] == D
        want = x[[row[k] for k in keys]]
        np.testing.assert_array_equal(vectors, want.astype(np.float16))
        clusters = table.column("cluster").to_numpy()
        assert (np.diff(clusters) >= 0).all()  # one cluster's rows are contiguous
        np.testing.assert_array_equal(clusters, assign(want, centroids))


def test_an_incremental_run_reads_only_the_kept_members_of_the_clusters_it_touches(
    store, monkeypatch
):
    layout, new_rows = store
    centroids = read_centroids(layout, CLIP, _version(layout))
    touched = set(assign(new_rows, centroids).tolist())
    kept0, vectors0 = _kept(layout, 0)
    kept1, _ = _kept(layout, 1)
    assert not touched & set(kept1.column("cluster").to_pylist())  # partition 1 is untouched
    opened, banks = [], []
    real_open, real_find = kept_bank._open_vectors, semantic_dedup.find_duplicates
    monkeypatch.setattr(kept_bank, "_open_vectors", lambda p: opened.append(p) or real_open(p))

    def find(*args):
        banks.append(args[4:])
        return real_find(*args)

    monkeypatch.setattr(semantic_dedup, "find_duplicates", find)
    _add(layout, 2, new_rows)
    result = curate(layout, CLIP, [SOURCE], CFG)
    assert result.partitions_new == 1 and result.removed_new >= ROWS // 5
    assert opened == [kept_bank.kept_vectors_path(layout, CLIP, _version(layout), SOURCE, 0)]
    [(vectors, clusters)] = banks
    in_touched = np.isin(kept0.column("cluster").to_numpy(), list(touched))
    np.testing.assert_array_equal(clusters, kept0.column("cluster").to_numpy()[in_touched])
    np.testing.assert_array_equal(vectors, vectors0[in_touched])
    removals = pq.read_table(layout.semdedup_removals(CLIP, _version(layout), SOURCE, 2))
    kept_names = {f"{SOURCE}/{k}" for k in kept0.column("key").to_pylist()}
    assert set(removals.column("duplicate_of").to_pylist()) & kept_names


def _to_older_layout(layout: StorageLayout, shard: int) -> None:
    """The kept files as written before the .npy: one Parquet with the vectors, in batch order."""
    table, vectors = _kept(layout, shard)
    order = np.argsort(table.column("key").to_numpy(zero_copy_only=False), kind="stable")
    older = pa.table(
        {
            "key": table.column("key").take(pa.array(order)),
            "cluster": table.column("cluster").take(pa.array(order)),
            "image_embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors[order].astype(np.float16).reshape(-1)), vectors.shape[1]
            ),
        }
    )
    pq.write_table(older, layout.semdedup_kept(CLIP, _version(layout), SOURCE, shard))
    Path(kept_bank.kept_vectors_path(layout, CLIP, _version(layout), SOURCE, shard)).unlink()


def test_a_store_of_the_older_layout_gives_the_same_removal_lists(store, tmp_path):
    layout, new_rows = store
    older = StorageLayout(str(tmp_path / "older"))
    shutil.copytree(layout.root, older.root)
    for shard in (0, 1):
        _to_older_layout(older, shard)
    for root in (layout, older):
        _add(root, 2, new_rows)
        curate(root, CLIP, [SOURCE], CFG)
    assert _removals(older, 2) == _removals(layout, 2)
    assert read_state(older, CLIP, _version(older)) == read_state(layout, CLIP, _version(layout))
    # partition 0 was read, so its vectors are a .npy now, row for row with its Parquet
    table, vectors = _kept(older, 0)
    new_table, new_vectors = _kept(layout, 0)
    row = {k: i for i, k in enumerate(new_table.column("key").to_pylist())}
    np.testing.assert_array_equal(
        vectors, new_vectors[[row[k] for k in table.column("key").to_pylist()]]
    )


def test_bank_files_that_disagree_are_named(store):
    layout, new_rows = store
    vectors = kept_bank.kept_vectors_path(layout, CLIP, _version(layout), SOURCE, 0)
    saved = Path(vectors).read_bytes()
    np.save(vectors, np.load(vectors)[:-1])
    _add(layout, 2, new_rows)
    with pytest.raises(ValueError, match="vectors but") as e:
        curate(layout, CLIP, [SOURCE], CFG)
    assert vectors in str(e.value) and "kept/" in str(e.value)
    Path(vectors).unlink()
    with pytest.raises(FileNotFoundError, match="--recluster") as e:
        curate(layout, CLIP, [SOURCE], CFG)
    assert vectors in str(e.value)
    Path(vectors).write_bytes(saved)
    assert curate(layout, CLIP, [SOURCE], CFG).partitions_new == 1


def test_object_storage_gives_the_local_removal_lists(store):
    layout, new_rows = store
    remote = StorageLayout(f"memory://kept-bank-{uuid.uuid4().hex[:8]}")
    mem = fsspec.filesystem("memory")
    try:
        for shard in (0, 1):
            emb = pq.read_table(layout.embedding_shard(CLIP, SOURCE, shard))
            _add(remote, shard, vectors_to_numpy(emb.column("image_embedding")))
        curate(remote, CLIP, [SOURCE], CFG)
        for root in (layout, remote):
            _add(root, 2, new_rows)
            curate(root, CLIP, [SOURCE], CFG)
        for shard in (0, 1, 2):
            path = remote.semdedup_removals(CLIP, _version(remote), SOURCE, shard)
            assert mem.cat(path) == _removals(layout, shard)
    finally:
        mem.rm(remote.root.removeprefix("memory://"), recursive=True)
