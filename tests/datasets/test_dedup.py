"""(url, caption) dedup: hashes, the per-source index, and its use when sources are planned."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unclip.datasets import dedup
from unclip.datasets.source_plan import plan_source
from unclip.datasets.storage import StorageLayout

from .conftest import ingest_cfg


def test_hashes_are_128_bit_and_separate_url_from_caption():
    h = dedup.url_caption_hashes(["http://a/b", "http://a/", "http://a/b"], ["c", "bc", "c"])
    assert h.dtype == np.dtype("S16") and len(h) == 3
    assert h[0] == h[2] and h[0] != h[1]
    assert dedup.first_occurrence(h).tolist() == [True, True, False]
    assert dedup.url_caption_hashes([None], [None])[0] == dedup.url_caption_hashes([""], [""])[0]
    with pytest.raises(ValueError):  # a caption column shorter than the urls is a bug upstream
        dedup.url_caption_hashes(["http://a/b", "http://a/c"], ["c"])


def test_index_round_trip_and_exclusion():
    empty = dedup.load_index(StorageLayout("memory://dedup-index-none"))
    assert empty.dtype == np.dtype("S16") and len(empty) == 0
    layout = StorageLayout("memory://dedup-index")
    a = dedup.url_caption_hashes(["u1", "u2"], ["c", "c"])
    b = dedup.url_caption_hashes(["u3"], ["c"])
    dedup.record_source(layout, "aaaa", a)
    dedup.record_source(layout, "bbbb", b)
    index = dedup.load_index(layout)
    assert sorted(index.tolist()) == sorted([*a.tolist(), *b.tolist()])
    assert sorted(dedup.load_index(layout, exclude="aaaa").tolist()) == b.tolist()
    q = dedup.url_caption_hashes(["u2", "u9", "u9"], ["c", "c", "c"])
    assert dedup.duplicates(q, index).tolist() == [True, False, True]
    assert dedup.is_recorded(layout, "aaaa") and not dedup.is_recorded(layout, "cccc")


def write_list(path, urls, captions):
    pq.write_table(pa.table({"url": urls, "caption": captions}), path)
    return str(path)


def test_sources_are_deduplicated_against_earlier_ones_and_fixed_once_planned(tmp_path):
    layout = StorageLayout(str(tmp_path / "store"))
    cfg = ingest_cfg(samples_per_shard=2)
    urls = [f"http://h/{i}.png" for i in range(6)]
    a = write_list(tmp_path / "a.parquet", urls[:4], ["x"] * 4)
    b = write_list(tmp_path / "b.parquet", urls[2:] + [urls[5]], ["x"] * 5)
    pa_ = plan_source(layout, a, cfg)
    assert (pa_.num_rows, pa_.shards_total, pa_.filtered) == (4, 2, {})
    pb = plan_source(layout, b, cfg)
    # 2 rows repeat list a, 1 repeats a row of b itself
    assert (pb.num_rows, pb.filtered) == (2, {"dedup_url_caption": 3})
    kept = pq.read_table(layout.ingest_rows(pb.source_id)).column("url").to_pylist()
    assert kept == urls[4:6]
    # Planning again (same lists, the index now holding both) changes nothing for either.
    assert plan_source(layout, a, cfg).num_rows == 4
    assert plan_source(layout, b, cfg).num_rows == 2
    c = write_list(tmp_path / "c.parquet", urls, ["x"] * 6)
    assert plan_source(layout, c, cfg).filtered == {"dedup_url_caption": 6}
    assert plan_source(layout, b, cfg).num_rows == 2


def test_a_plan_killed_after_recording_its_hashes_is_not_deduplicated_against_itself(tmp_path):
    """The index holds the source's own record but no plan was committed: re-planning keeps every row."""
    layout = StorageLayout(str(tmp_path / "store"))
    cfg = ingest_cfg(samples_per_shard=2)
    urls = [f"http://h/{i}.png" for i in range(4)]
    a = write_list(tmp_path / "a.parquet", urls, ["x"] * 4)
    first = plan_source(layout, a, cfg)
    # What a process killed between dedup.record_source and the plan's commit leaves behind:
    # the source's hashes in the index, no _plan.json (the commit) and no rows.
    for path in (layout.ingest_plan(first.source_id), layout.ingest_rows(first.source_id)):
        StorageLayout(layout.root).fs.rm(path)
    assert dedup.is_recorded(layout, first.source_id)
    again = plan_source(layout, a, cfg)
    assert (again.num_rows, again.filtered) == (4, {})
    kept = pq.read_table(layout.ingest_rows(again.source_id)).column("url").to_pylist()
    assert kept == urls
    # The index still dedups another list against it.
    b = write_list(tmp_path / "b.parquet", urls[:2], ["x"] * 2)
    assert plan_source(layout, b, cfg).filtered == {"dedup_url_caption": 2}


def test_a_row_repeated_in_a_list_is_kept_once_against_a_large_index():
    """numpy's sort-based membership test (large indexes) must not take repeats for index hits."""
    index = np.unique(dedup.url_caption_hashes([f"u{i}" for i in range(500)], ["c"] * 500))
    q = dedup.url_caption_hashes(["new", "new", "u3", "u3", "other"], ["c"] * 5)
    assert dedup.duplicates(q, index).tolist() == [False, True, True, True, False]


def test_hashes_are_read_from_a_sliced_column_at_its_offset():
    """An Arrow column may start inside its buffer (a slice): the hashes read are its own rows."""
    rows = dedup.url_caption_hashes(["u1", "u2", "u3"], ["c"] * 3)
    col = pa.array(rows.tolist(), pa.binary(16))
    assert dedup.hashes_of(col).tolist() == rows.tolist()
    assert dedup.hashes_of(col.slice(1)).tolist() == rows[1:].tolist()
    assert dedup.hashes_of(col.slice(1, 1)).tolist() == rows[1:2].tolist()
    assert dedup.hashes_of(col.slice(3)).tolist() == []
    assert dedup.hashes_of(pa.array([], pa.binary(16))).dtype == np.dtype("S16")
