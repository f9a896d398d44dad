"""Semantic dedup: greedy groups inside clusters, removal lists, incremental runs, crash safety."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from unclip.datasets.config import SemanticDedupConfig
from unclip.datasets.duplicate_groups import assign, find_duplicates, fit_centroids
from unclip.datasets.embedding_file import vectors_to_numpy
from unclip.datasets.semantic_dedup import (
    curate,
    current_version,
    read_state,
    removal_list,
    removed_keys,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_planted_duplicates_are_found_and_every_kept_pair_is_below_the_threshold():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 64))
    base = _unit(1.3 * centres[rng.integers(0, 8, 300)] + rng.normal(size=(300, 64)))
    copies = _unit(base[:100] + 0.03 * rng.normal(size=(100, 64)))
    x = np.concatenate([base, copies])
    centroids = fit_centroids(x, 8, 10, 0, 64)
    clusters = assign(x, centroids)
    found = find_duplicates(x, clusters, np.arange(len(x)), 0.9)
    removed = np.flatnonzero(found.of != -1)
    assert set(removed) == set(range(300, 400))  # each copy, nothing else
    assert (found.of[300:] == np.arange(100)).all()  # names the original seen first
    kept = x[found.of == -1]
    sims = kept @ kept.T
    assert (sims[np.triu_indices(len(kept), 1)] < 0.9).all()
    # visiting the copies first keeps them instead
    prio = np.concatenate([np.arange(100, 400), np.arange(100)])
    again = find_duplicates(x, clusters, prio, 0.9)
    assert set(np.flatnonzero(again.of != -1)) == set(range(100))


def test_a_bank_of_kept_rows_is_never_removed_and_removes_its_copies():
    rng = np.random.default_rng(1)
    bank = _unit(rng.normal(size=(50, 32)))
    x = _unit(
        np.concatenate([bank[:10] + 0.02 * rng.normal(size=(10, 32)), rng.normal(size=(20, 32))])
    )
    centroids = fit_centroids(np.concatenate([bank, x]), 4, 10, 0, 64)
    found = find_duplicates(
        x, assign(x, centroids), np.arange(30), 0.9, bank, assign(bank, centroids)
    )
    assert (found.of[:10] == -2 - np.arange(10)).all()  # bank row i is -2 - i
    assert (found.of[10:] == -1).all()


def _threshold_with_some_duplicates(store) -> float:
    """A similarity that the tiny CLIP's shape embeddings straddle (some pairs above, most below)."""
    xs = []
    for shard in store.shards:
        t = pq.read_table(store.layout.embedding_shard(store.clip_id, store.source, shard))
        xs.append(_unit(vectors_to_numpy(t.column("image_embedding"))))
    x = np.concatenate(xs)
    sims = (x @ x.T)[np.triu_indices(len(x), 1)]
    return float(np.quantile(sims, 0.97))


def _cfg(store, **kw) -> SemanticDedupConfig:
    base = {
        "similarity": _threshold_with_some_duplicates(store),
        "cluster_size": 10,
    }
    return SemanticDedupConfig(**{**base, **kw})


def _removals(store, version: str) -> dict[int, bytes]:
    return {
        s: Path(
            store.layout.semdedup_removals(store.clip_id, version, store.source, s)
        ).read_bytes()
        for s in store.shards
    }


def test_same_inputs_give_the_same_removal_lists(shapes_store, tmp_path):
    store = shapes_store
    cfg = _cfg(store)
    first = curate(store.layout, store.clip_id, [store.source], cfg)
    assert first.reclustered and first.partitions_new == 2 and first.removed_new > 0
    lists = _removals(store, first.version)
    table = pq.read_table(
        store.layout.semdedup_removals(store.clip_id, first.version, store.source, 0)
    )
    assert table.column_names == ["key", "duplicate_of", "similarity"]
    assert (table.column("similarity").to_numpy() >= cfg.similarity - 1e-6).all()
    other = tmp_path / "again"
    shutil.copytree(store.root, other, ignore=shutil.ignore_patterns("curation"))
    from unclip.datasets.storage import StorageLayout

    second = curate(StorageLayout(str(other)), store.clip_id, [store.source], cfg)
    assert second.version == first.version
    again = {
        s: Path(
            StorageLayout(str(other)).semdedup_removals(
                store.clip_id, second.version, store.source, s
            )
        ).read_bytes()
        for s in store.shards
    }
    assert again == lists
    # a re-run with nothing new does no work
    third = curate(store.layout, store.clip_id, [store.source], cfg)
    assert third.partitions_new == 0 and _removals(store, first.version) == lists


def test_a_new_partition_is_compared_with_the_kept_members_only(shapes_store):
    store = shapes_store
    layout, clip = store.layout, store.clip_id
    cfg = _cfg(store, keep="first_seen")
    later = Path(layout.embedding_shard(clip, store.source, 1))
    held = later.read_bytes()
    later.unlink()
    first = curate(layout, clip, [store.source], cfg)
    assert first.partitions_total == 1
    before = _removals_of(store, first.version, 0)
    later.write_bytes(held)
    second = curate(layout, clip, [store.source], cfg)
    assert not second.reclustered and second.version == first.version
    assert second.partitions_new == 1 and second.rows_new == 20
    assert _removals_of(store, first.version, 0) == before  # never rewritten
    state = read_state(layout, clip, first.version)
    assert sorted(state["partitions"]) == [f"{store.source}/00000", f"{store.source}/00001"]
    kept0 = pq.read_table(layout.semdedup_kept(clip, first.version, store.source, 0))
    kept_names = {f"{store.source}/{k}" for k in kept0.column("key").to_pylist()}
    removed1 = removal_list(layout, clip, (store.source, 1))
    keys1 = set(pq.read_table(later).column("key").to_pylist())
    for key, of in zip(
        removed1.column("key").to_pylist(), removed1.column("duplicate_of").to_pylist(), strict=True
    ):
        assert key in keys1
        assert of in kept_names or of.startswith(f"{store.source}/") and of.split("/")[1] in keys1
    # no kept row of the new partition is a duplicate of a kept member of its cluster
    kept1 = pq.read_table(layout.semdedup_kept(clip, first.version, store.source, 1))
    x0, x1 = _rows_of(store, 0, kept0), _rows_of(store, 1, kept1)  # as curate read them
    c0, c1 = kept0.column("cluster").to_numpy(), kept1.column("cluster").to_numpy()
    sims = x1 @ x0.T
    same = c1[:, None] == c0[None, :]
    assert same.any() and not (sims[same] >= cfg.similarity).any()
    assert any(of in kept_names for of in removed1.column("duplicate_of").to_pylist())
    assert removed_keys(layout, clip) >= {
        f"{store.source}/{k}" for k in removed1.column("key").to_pylist()
    }


def _rows_of(store, shard: int, kept) -> np.ndarray:
    """The unit image embeddings of ``kept``'s keys, from the shard's embedding file."""
    t = pq.read_table(store.layout.embedding_shard(store.clip_id, store.source, shard))
    row = {k: i for i, k in enumerate(t.column("key").to_pylist())}
    x = _unit(vectors_to_numpy(t.column("image_embedding")))
    return x[[row[k] for k in kept.column("key").to_pylist()]]


def _removals_of(store, version: str, shard: int) -> bytes:
    return Path(
        store.layout.semdedup_removals(store.clip_id, version, store.source, shard)
    ).read_bytes()


_RECLUSTER_SLOWLY = """
import sys, time
from unclip.datasets import semantic_dedup
from unclip.datasets.config import SemanticDedupConfig
from unclip.datasets.storage import StorageLayout
real = semantic_dedup._write_partitions
def slow(*a, **k):
    out = real(*a, **k)
    print("written", flush=True)
    time.sleep(60)  # killed here: partition files written, state and pointer not
    return out
semantic_dedup._write_partitions = slow
root, clip, source, cfg = sys.argv[1:5]
semantic_dedup.curate(StorageLayout(root), clip, [source],
                      SemanticDedupConfig.model_validate_json(cfg), recluster=True)
"""


def test_a_recluster_killed_mid_stage_leaves_the_version_in_use_intact(shapes_store):
    store = shapes_store
    layout, clip = store.layout, store.clip_id
    first = curate(layout, clip, [store.source], _cfg(store))
    lists = _removals(store, first.version)
    state = read_state(layout, clip, first.version)
    other = _cfg(store, cluster_size=5, seed=7)  # new centroids: a new version
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _RECLUSTER_SLOWLY,
            layout.root,
            clip,
            store.source,
            other.model_dump_json(),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    started = {p.name for p in Path(layout.semdedup_dir(clip)).iterdir() if p.is_dir()}
    assert len(started - {first.version}) == 1  # the new version was under way
    assert current_version(layout, clip) == first.version
    assert _removals(store, first.version) == lists
    assert read_state(layout, clip, first.version) == state
    assert removal_list(layout, clip, (store.source, 0)) is not None


@pytest.mark.parametrize("keep", ["highest_clip_score", "first_seen"])
def test_the_keep_rule_decides_which_sample_stays(keep):
    rng = np.random.default_rng(2)
    a = _unit(rng.normal(size=(1, 16)))
    x = np.concatenate([a, a, _unit(rng.normal(size=(1, 16)))])
    scores = np.array([0.1, 0.9, 0.5])
    prio = np.arange(3) if keep == "first_seen" else np.argsort(np.argsort(-scores))
    found = find_duplicates(x, np.zeros(3, np.int32), prio, 0.99)
    assert list(found.of) == ([-1, 0, -1] if keep == "first_seen" else [1, -1, -1])


def test_a_curated_store_moved_to_another_root_curates_on(shapes_store, tmp_path):
    """A version's files are found under the root it is read from; a store keeping ``state.json``
    and ``centroids.npy`` under its version folder's full path repeated below the root (as stores
    written before did) is read as well."""
    from unclip.datasets.storage import StorageLayout

    store = shapes_store
    cfg = _cfg(store, keep="first_seen")
    later = Path(store.layout.embedding_shard(store.clip_id, store.source, 1))
    held = later.read_bytes()
    later.unlink()
    version = curate(store.layout, store.clip_id, [store.source], cfg).version
    moved, nested = (StorageLayout(str(tmp_path / name)) for name in ("moved", "nested"))
    for layout in (moved, nested):
        shutil.copytree(store.root, layout.root)
    for name in ("state.json", "centroids.npy"):
        where = Path(nested.semdedup_version_file(store.clip_id, version, name))
        old = Path(nested.join(nested.semdedup_version(store.clip_id, version), name))
        old.parent.mkdir(parents=True, exist_ok=True)
        where.rename(old)
    lists = []
    for layout in (store.layout, moved, nested):
        Path(layout.embedding_shard(store.clip_id, store.source, 1)).write_bytes(held)
        result = curate(layout, store.clip_id, [store.source], cfg)
        assert result.version == version and result.partitions_new == 1
        lists.append(Path(layout.semdedup_removals(store.clip_id, version, store.source, 1)))
    assert lists[0].read_bytes() == lists[1].read_bytes() == lists[2].read_bytes()


def test_the_per_cluster_products_run_on_one_blas_thread(monkeypatch):
    """Small products on several BLAS threads made an increment several times slower on busy
    CPUs; the dedup holds BLAS to one thread, and gives the threads back after."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from unclip.datasets import duplicate_groups

    def blas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    seen, real = [], duplicate_groups._dedup_block
    monkeypatch.setattr(
        duplicate_groups,
        "_dedup_block",
        lambda *a: seen.append(blas_threads()) or real(*a),
    )
    x = _unit(np.random.default_rng(3).normal(size=(20, 8)))
    with threadpool_limits(limits=2, user_api="blas"):  # as on a machine of two CPUs or more
        before = blas_threads()
        find_duplicates(x, np.arange(20, dtype=np.int32) % 2, np.arange(20), 0.9)
        assert blas_threads() == before
    assert before and set(before) == {2}
    assert len(seen) == 2 and all(threads == [1] * len(before) for threads in seen)
