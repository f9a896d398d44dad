"""The whole-split readers: hold-out split, embeddings, image pairs, and the checks on the way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from unclip.datasets.manifest import assemble_manifest
from unclip.datasets.readers import (
    in_holdout,
    load_embeddings,
    load_image_pairs,
    load_images_captions,
    load_manifest,
)


def test_in_holdout_is_deterministic_and_near_fraction():
    keys = [f"src/{i:07d}" for i in range(4000)]
    picked = [in_holdout(k, 0.1) for k in keys]
    assert picked == [in_holdout(k, 0.1) for k in keys]
    assert 0.08 < sum(picked) / len(keys) < 0.12
    assert not any(in_holdout(k, 0.0) for k in keys)
    assert all(in_holdout(k, 1.0) for k in keys)


def test_splits_are_disjoint_and_cover_all(shapes_store):
    layout = shapes_store.layout
    m = assemble_manifest(layout, shapes_store.clip_id, [shapes_store.source])
    train = load_embeddings(layout, m, "train", 0.25)
    hold = load_embeddings(layout, m, "holdout", 0.25)
    every = load_embeddings(layout, m, "all", 0.25)
    assert set(train.keys).isdisjoint(hold.keys)
    assert sorted(train.keys + hold.keys) == sorted(every.keys) and len(every.keys) == 40
    assert 0 < len(hold.keys) < 40
    assert train.image.dtype == np.float32 and train.image.shape == (len(train.keys), 32)
    assert load_embeddings(layout, m, "holdout", 0.25).keys == hold.keys  # deterministic
    assert all(k.startswith(shapes_store.source + "/") for k in every.keys)
    with pytest.raises(ValueError, match="split"):
        load_embeddings(layout, m, "test", 0.25)


def test_image_pairs_join_embeddings_by_key(shapes_store):
    layout = shapes_store.layout
    m = assemble_manifest(layout, shapes_store.clip_id, [shapes_store.source])
    emb = load_embeddings(layout, m, "holdout", 0.3)
    pairs = load_image_pairs(layout, m, "holdout", 0.3, image_size=16)
    assert sorted(pairs.keys) == sorted(emb.keys)
    assert pairs.images.dtype == np.uint8 and pairs.images.shape == (len(emb.keys), 16, 16, 3)
    by_key = dict(zip(emb.keys, emb.image, strict=True))
    for k, e, c in zip(pairs.keys, pairs.image_emb, pairs.captions, strict=True):
        np.testing.assert_array_equal(e, by_key[k])
        assert c == emb.captions[emb.keys.index(k)]
    full = load_image_pairs(layout, m, "all", 0.3)
    assert full.images.shape == (40, 32, 32, 3) and full.skipped["not_in_embeddings"] == 0


def test_images_captions_before_embeddings_ignore_unfinished_shards(shapes_store):
    layout, src = shapes_store.layout, shapes_store.source
    tar1 = Path(layout.image_shard(src, 1))
    tar1.rename(tar1.with_name(tar1.name + ".tmp-0badc0de"))  # a writer killed mid-rename
    pairs = load_images_captions(layout, [src], "all", 0.2)
    assert len(pairs.keys) == 20 and pairs.images.shape == (20, 32, 32, 3)
    assert pairs.image_emb is None and pairs.text_emb is None
    assert all(c.startswith(("a ", "an ")) for c in pairs.captions)
    train = load_images_captions(layout, [src], "train", 0.2, image_size=8)
    assert train.images.shape[1:] == (8, 8, 3) and len(train.keys) < 20


def test_missing_manifest_names_version_and_path(shapes_store):
    with pytest.raises(FileNotFoundError) as e:
        load_manifest(shapes_store.layout, "deadbeef")
    assert "deadbeef" in str(e.value) and "manifests" in str(e.value)
    m = assemble_manifest(shapes_store.layout, shapes_store.clip_id, [shapes_store.source])
    assert load_manifest(shapes_store.layout, m["version"]) == m


def test_clip_id_mismatch_and_changed_files_raise(shapes_store):
    layout = shapes_store.layout
    m = assemble_manifest(layout, shapes_store.clip_id, [shapes_store.source])
    with pytest.raises(ValueError, match="written by CLIP"):
        load_embeddings(layout, {**m, "clip_id": "another-clip"}, "all", 0.1)
    with pytest.raises(ValueError, match="embedding_dim"):
        load_embeddings(layout, {**m, "embedding_dim": 64}, "all", 0.1)
    emb = Path(layout.join(m["shards"][1]["embeddings"]))
    emb.write_bytes(emb.read_bytes()[:-100])  # truncated by a writer elsewhere
    with pytest.raises(ValueError, match="sha256"):
        load_image_pairs(layout, m, "all", 0.1)


def test_shard_without_embeddings_left_out_of_manifest_and_missing_file_named(shapes_store):
    layout, src = shapes_store.layout, shapes_store.source
    m = assemble_manifest(layout, shapes_store.clip_id, [src])
    emb1 = Path(layout.join(m["shards"][1]["embeddings"]))
    emb1.unlink()  # image shard 1 now has no embeddings
    partial = assemble_manifest(layout, shapes_store.clip_id, [src])
    assert [s["shard"] for s in partial["shards"]] == [0] and partial["num_samples"] == 20
    with pytest.raises(FileNotFoundError) as e:  # an older manifest that lists it
        load_image_pairs(layout, m, "all", 0.1)
    assert str(emb1) in str(e.value)


def test_corrupt_member_and_key_without_embedding_are_counted_skips(shapes_store):
    """After embedding, a tar member got corrupted and a sample with no embedding appeared."""
    import io
    import tarfile

    layout, src = shapes_store.layout, shapes_store.source
    m = assemble_manifest(layout, shapes_store.clip_id, [src])
    tar = Path(layout.image_shard(src, 1))
    with tarfile.open(tar) as t:
        members = [(i.name, t.extractfile(i).read()) for i in t]
    jpgs = sorted(n for n, _ in members if n.endswith(".jpg"))
    bad_key = f"{src}/{jpgs[2].split('.')[0]}"
    extra = [
        (f"zz_extra.{n.split('.', 1)[1]}", d) for n, d in members if n.startswith(jpgs[0][:-4])
    ]
    with tarfile.open(tar, "w") as t:
        for name, data in members + extra:
            data = b"not a jpeg" if name == jpgs[2] else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))

    pairs = load_image_pairs(layout, m, "all", 0.0)
    assert pairs.skipped["corrupt"] == 1 and pairs.skipped["not_in_embeddings"] == 1
    assert len(pairs.keys) == 39 and bad_key not in pairs.keys
    assert f"{src}/zz_extra" not in pairs.keys
