"""Perceptual near-duplicates: the pHash index, and ingest dropping edited copies across shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from unclip.datasets.config import FilterConfig
from unclip.datasets.perceptual_hash import (
    NearDuplicateIndex,
    earlier_shard_hashes,
    hamming,
    hex_to_uint64,
    phash_hex,
)
from unclip.datasets.storage import StorageLayout
from unclip.datasets.synthetic_photos import EDITS, edited_copy, jpeg, photo

from .conftest import ingest_cfg, ingest_without_ray, serve_bad

DISTANCE = 10


def test_the_index_finds_hashes_within_the_distance_and_only_those():
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 2**63, 2000, dtype=np.uint64)
    index = NearDuplicateIndex(6, stored, [f"k{i}" for i in range(len(stored))])
    for i in range(0, 2000, 97):
        bits = rng.choice(64, 6, replace=False)
        probe = int(stored[i]) ^ sum(1 << int(b) for b in bits)
        assert index.find(probe) == (f"k{i}", 6)
        far = int(stored[i]) ^ sum(1 << int(b) for b in rng.choice(64, 7, replace=False))
        found = index.find(far)
        # never the 7-bit neighbour; another stored hash only if it really is within 6 bits
        assert found is None or int(hamming(far, stored[[int(found[0][1:])]])[0]) <= 6
    assert index.find(int(stored[5])) == ("k5", 0)
    index.add(12345, "new")
    assert index.find(12345 ^ 0b111) == ("new", 3)


def test_edited_copies_are_near_and_distinct_photos_are_far():
    hashes = hex_to_uint64([phash_hex(jpeg(photo(s))) for s in range(60)])
    index = NearDuplicateIndex(DISTANCE, hashes, [str(s) for s in range(60)])
    caught = 0
    for s in range(60):
        for i, edit in enumerate(EDITS):
            copy = jpeg(edited_copy(photo(s), edit, seed=100 * s + i))
            found = index.find(int(phash_hex(copy), 16))
            assert found is None or found[0] == str(s), (s, edit, found)
            caught += found is not None
        others = np.delete(hashes, s)
        assert hamming(hashes[s], others).min() > DISTANCE
    assert caught >= 0.95 * 60 * len(EDITS)


def _serve_list(path: Path, base: str, names: list[str]) -> str:
    rows = [{"url": f"{base}/{n}", "caption": f"caption of {n}"} for n in names]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_ingest_drops_near_duplicates_within_a_shard_and_against_earlier_shards(tmp_path):
    layout = StorageLayout(str(tmp_path / "store"))
    with serve_bad() as (base, server):
        routes = {}
        for s in range(8):  # shard 0: eight distinct photos
            routes[f"/p/{s}.jpg"] = jpeg(photo(s))
        for s in range(4):  # shard 1: edited copies of shard 0's photos ...
            routes[f"/copy/{s}.jpg"] = jpeg(edited_copy(photo(s), EDITS[s], seed=s))
        routes["/p/20.jpg"] = jpeg(photo(20))  # ... a new photo and a re-encode of it
        routes["/copy/20.jpg"] = jpeg(edited_copy(photo(20), "reencode", seed=1), quality=60)
        routes["/p/21.jpg"], routes["/p/22.jpg"] = jpeg(photo(21)), jpeg(photo(22))
        for path, body in routes.items():
            server.static[path] = ("image/jpeg", body, {})
        names = [f"p/{s}.jpg" for s in range(8)]
        names += [f"copy/{s}.jpg" for s in range(4)] + ["p/20.jpg", "copy/20.jpg"]
        names += ["p/21.jpg", "p/22.jpg"]
        url_list = _serve_list(tmp_path / "list.jsonl", base, names)
        cfg = ingest_cfg(
            samples_per_shard=8,
            thread_count=1,  # one thread: the new photo is written before its copy
            image_size=64,
            filters=FilterConfig(phash_max_distance=DISTANCE),
        )
        source = ingest_without_ray(layout, url_list, cfg)
    first = pq.read_table(layout.image_shard_parquet(source, 0)).to_pylist()
    second = pq.read_table(layout.image_shard_parquet(source, 1)).to_pylist()
    assert all(r["status"] == "success" and len(r["phash"]) == 16 for r in first)
    by_url = {r["url"].split("/", 3)[-1]: r for r in second}
    for s in range(4):
        row = by_url[f"copy/{s}.jpg"]
        assert row["status"] == "filtered", (s, row["error_message"])
        assert "dedup_image_phash" in row["error_message"]
        assert first[s]["key"] in row["error_message"]  # names the kept original
    assert by_url["copy/20.jpg"]["status"] == "filtered"
    assert by_url["p/20.jpg"]["key"] in by_url["copy/20.jpg"]["error_message"]
    for kept in ("p/20.jpg", "p/21.jpg", "p/22.jpg"):
        assert by_url[kept]["status"] == "success"
    stats = json.loads(Path(layout.image_shard_stats(source, 1)).read_text())
    assert stats["filtered"] == {"dedup_image_phash": 5}
    assert stats["successes"] == 3
    # the index of earlier shards comes from the Parquet column: kept rows only
    assert len(earlier_shard_hashes(layout, source, 2)) == 8 + 3


@pytest.mark.parametrize("distance", [-1, 32])
def test_a_distance_outside_the_bands_is_refused(distance):
    with pytest.raises(ValueError, match="phash distance"):
        NearDuplicateIndex(distance, np.zeros(1, np.uint64), ["a"])
