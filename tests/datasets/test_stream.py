"""The training stream: order, shares, blocks, resume, and bad shards met on the way."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from unclip.datasets.manifest import assemble_manifest
from unclip.datasets.readers import load_embeddings, load_image_pairs
from unclip.datasets.stream import (
    RankStream,
    StreamPlan,
    StreamShard,
    check_world_change,
    rank_spans,
    shard_order,
)
from unclip.datasets.stream_sources import (
    EmbeddingSource,
    ImagePairSource,
    IngestedImageSource,
    manifest_counts,
)


def take(source, rank: int, world: int, batch: int, steps: int, start: int = 0, block: int = 8):
    """``steps`` micro-batches of rank ``rank`` from micro-step ``start`` (read in this thread,
    so nothing past them is read ahead)."""
    plan = StreamPlan.make(source.shards, rank, world, batch, block, seed=3)
    stream = RankStream(source, plan, prefetch=0)
    return list(itertools.islice(stream.batches(start), steps)), stream


# --- the order: pure functions ------------------------------------------------------------------
def test_ranks_take_disjoint_contiguous_slices_that_cover_the_epoch():
    counts = np.array([5, 0, 7, 3, 9, 1])
    order = shard_order(counts, seed=1, epoch=0)
    assert sorted(order) == [0, 2, 3, 4, 5]  # the empty shard is left out
    assert not np.array_equal(order, shard_order(counts, seed=1, epoch=1))
    covered = []
    for r in range(3):
        for shard, a, b in rank_spans(counts, order, r * 8, (r + 1) * 8):
            assert 0 <= a < b <= counts[shard]
            covered += [(int(shard), i) for i in range(a, b)]
    assert len(covered) == len(set(covered)) == 24  # 25 samples, 3 ranks of 8


def test_every_rank_takes_the_same_steps_whatever_its_shards():
    shards = [StreamShard(f"s{i}", c) for i, c in enumerate([3, 40, 1, 17, 2])]
    plans = [StreamPlan.make(shards, r, 3, 4, 10, seed=0) for r in range(3)]
    assert {p.steps_per_epoch for p in plans} == {(63 // 3) // 4}
    assert plans[0].block == 8  # rounded down to a multiple of the micro-batch
    assert plans[0].locate(3 + 2 * plans[0].steps_per_epoch) == (2, 1, 4)  # sample 12 of epoch 2
    with pytest.raises(ValueError, match="one micro-batch"):
        StreamPlan.make(shards, 0, 3, 64, 128, seed=0)
    with pytest.raises(ValueError, match="hold no samples"):
        StreamPlan.make([StreamShard("e", 0)], 0, 1, 1, 1, seed=0)


def test_world_size_changes_only_at_an_epoch_boundary():
    check_world_change(4, 4, 7)
    check_world_change(4, 2, 0)
    with pytest.raises(ValueError, match="written by 4 workers.*with 2"):
        check_world_change(4, 2, 3)


# --- real sources on an ingested, embedded store -------------------------------------------------
@pytest.fixture
def manifest(shapes_store) -> dict:
    return assemble_manifest(shapes_store.layout, shapes_store.clip_id, [shapes_store.source])


def test_embedding_stream_serves_the_split_each_rank_its_own_rows(shapes_store, manifest):
    layout = shapes_store.layout
    train = load_embeddings(layout, manifest, "train", 0.25)
    source = EmbeddingSource(layout, manifest, "train", 0.25)
    assert sum(s.count for s in source.shards) == len(train.keys)
    per_rank = []
    for r in range(2):
        batches, stream = take(source, r, 2, batch=4, steps=3)
        keys = [k for b in batches for k in b["key"]]
        assert len(keys) == len(set(keys)) == 12  # one epoch: no sample twice
        per_rank.append(set(keys))
        by_key = dict(zip(train.keys, train.text, strict=True))
        for b in batches:  # rows travel with their keys
            assert b["image_embedding"].shape == (4, 32)
            for k, t in zip(b["key"], b["text_embedding"], strict=True):
                np.testing.assert_array_equal(t, by_key[f"{shapes_store.source}/{k}"])
        assert stream.stats.replaced == 0
    assert per_rank[0].isdisjoint(per_rank[1])
    # the order is fixed by the seed: the same batches again, in the same order
    again, _ = take(EmbeddingSource(layout, manifest, "train", 0.25), 1, 2, batch=4, steps=3)
    assert [b["key"] for b in again] == [b["key"] for b in take(source, 1, 2, 4, 3)[0]]


def test_a_resumed_stream_goes_on_with_the_batch_that_came_next(shapes_store, manifest):
    source = ImagePairSource(shapes_store.layout, manifest, "all", 0.0, image_size=16)
    whole, _ = take(source, 1, 2, batch=4, steps=12)  # 2 epochs and a half of rank 1
    for start in (1, 3, 5, 7):
        tail, stream = take(source, 1, 2, batch=4, steps=12 - start, start=start)
        assert [b["key"] for b in tail] == [b["key"] for b in whole[start:]]
        np.testing.assert_array_equal(tail[0]["image"], whole[start]["image"])
        assert stream.stats.samples <= (12 - start) * 4 + 8  # at most one block re-read


def test_each_rank_reads_about_its_share_of_the_bytes(shapes_store, manifest):
    source = EmbeddingSource(shapes_store.layout, manifest, "all", 0.0)
    total = sum(
        Path(shapes_store.layout.join(s["embeddings"])).stat().st_size for s in manifest["shards"]
    )
    for r in range(2):
        _, stream = take(source, r, 2, batch=4, steps=5)  # one epoch: 20 of 40 rows
        assert stream.stats.shards_opened == 1
        assert stream.stats.bytes_read <= 1.1 * total / 2


def test_image_pairs_are_joined_and_decoded_like_the_whole_split_reader(shapes_store, manifest):
    layout = shapes_store.layout
    pairs = load_image_pairs(layout, manifest, "holdout", 0.3, image_size=16)
    source = ImagePairSource(layout, manifest, "holdout", 0.3, image_size=16)
    n = sum(s.count for s in source.shards)
    (batch,), _ = take(source, 0, 1, batch=n, steps=1)
    got = dict(zip(batch["key"], batch["image"], strict=True))
    for k, image, emb in zip(pairs.keys, pairs.images, pairs.image_emb, strict=True):
        np.testing.assert_array_equal(got[k.split("/", 1)[1]], image)
        i = batch["key"].index(k.split("/", 1)[1])
        np.testing.assert_array_equal(batch["image_embedding"][i], emb)
    upsampler = ImagePairSource(
        layout, manifest, "holdout", 0.3, image_size=16, with_embeddings=False
    )
    (only_images,), _ = take(upsampler, 0, 1, batch=n, steps=1)
    assert set(only_images) == {"key", "caption", "image"}


def test_bootstrap_clip_stream_reads_ingested_shards_by_their_parquet(shapes_store):
    layout, src = shapes_store.layout, shapes_store.source
    source = IngestedImageSource(layout, [src], "all", 0.0, image_size=8)
    assert [s.count for s in source.shards] == [20, 20]
    batches, _ = take(source, 0, 2, batch=5, steps=4)
    assert batches[0]["image"].shape == (5, 8, 8, 3) and len(batches[0]["caption"]) == 5
    assert all(c.startswith("a") for b in batches for c in b["caption"])


def test_counts_come_from_key_columns_once_per_version(shapes_store, manifest):
    layout = shapes_store.layout
    counts = manifest_counts(layout, manifest, "train", 0.25)
    cached = Path(layout.join("manifests", f"{manifest['version']}.counts-train-0.25.json"))
    assert json.loads(cached.read_text())["counts"] == counts
    hold = manifest_counts(layout, manifest, "holdout", 0.25)
    assert [a + b for a, b in zip(counts, hold, strict=True)] == [20, 20]


# --- bad input met mid-stream -----------------------------------------------------------------
def test_a_corrupt_and_a_truncated_member_are_replaced_and_counted(shapes_store, manifest):
    import io
    import tarfile

    layout, src = shapes_store.layout, shapes_store.source
    tar = Path(layout.image_shard(src, 1))
    with tarfile.open(tar) as t:
        members = [(i.name, t.extractfile(i).read()) for i in t]
    jpgs = sorted(n for n, _ in members if n.endswith(".jpg"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members:
            data = b"not a jpeg" if name == jpgs[2] else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    tar.write_bytes(data[: len(data) // 2])  # truncated: the second half of the shard is lost
    source = ImagePairSource(layout, manifest, "all", 0.0, image_size=16)
    plans = [StreamPlan.make(source.shards, r, 2, 4, 20, seed=0) for r in range(2)]
    streams = [RankStream(source, p) for p in plans]
    got = [list(itertools.islice(s.batches(0), 10)) for s in streams]
    assert [len(g) for g in got] == [10, 10]  # both ranks run every step: two epochs
    replaced = sum(s.stats.replaced for s in streams)
    assert replaced >= 2 * 10  # ~10 lost members a epoch, each epoch: filled and counted
    assert any("missing from the tar" in e for s in streams for e in s.stats.errors)
    assert any(
        "cannot identify image" in e or "Error" in e for s in streams for e in s.stats.errors
    )


def test_a_missing_shard_and_a_changed_file_are_errors_naming_them(shapes_store, manifest):
    layout = shapes_store.layout
    source = ImagePairSource(layout, manifest, "all", 0.0, image_size=16)
    tar = Path(layout.join(manifest["shards"][0]["images"]))
    tar.unlink()
    with pytest.raises(FileNotFoundError, match=str(tar)):
        for r in range(2):
            take(source, r, 2, batch=4, steps=5)
    emb = Path(layout.join(manifest["shards"][1]["embeddings"]))
    table = pq.read_table(emb)
    pq.write_table(table.slice(0, 15), emb)  # a file with other rows than the manifest's
    with pytest.raises(ValueError, match="sha256"):
        for r in range(2):
            take(EmbeddingSource(layout, manifest, "all", 0.0), r, 2, batch=4, steps=5)
    stale = {**manifest, "shards": [{**s, "sha256": None} for s in manifest["shards"]]}
    with pytest.raises(ValueError, match="00001.parquet: 15 samples pass.*lists 20"):
        source = EmbeddingSource(layout, stale, "all", 0.0, shards=[StreamShard("a", 20)] * 2)
        for r in range(2):
            take(source, r, 2, batch=4, steps=5)


def test_streams_read_object_storage_without_a_local_copy():
    """A store on an fsspec filesystem (memory://) streams like a local one, file by file."""
    import uuid

    from training_helpers import build_embedded_store

    store = build_embedded_store(f"memory://stream-{uuid.uuid4().hex[:8]}", num_pairs=40)
    keys = []
    for r in range(2):  # a source per rank, as each worker unpickles its own
        source = ImagePairSource(store.layout, store.manifest, "all", 0.0, image_size=16)
        batches, stream = take(source, r, 2, batch=4, steps=5)
        keys += [k for b in batches for k in b["key"]]
        assert stream.stats.bytes_read > 0 and stream.stats.replaced == 0
    assert len(keys) == len(set(keys)) == 40
