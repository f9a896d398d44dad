"""Bad input end to end: every row of a hostile list gets a status and a reason; nothing crashes.

One list (CSV, one shard) holds malformed rows, HTTP errors, stalled and endless bodies, a
redirect loop, broken and unusual images, a decompression bomb, an opt-out header, duplicates
within the list and of an earlier list, and a metadata threshold; it is ingested on a local Ray
next to a good list ingested first, whose shards must come out byte for byte the same.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unclip.datasets.config import FilterConfig, IngestConfig, MetadataRule
from unclip.datasets.ingest import (
    completed_shards,
    format_summary,
    ingest_source,
    retry_failed,
    source_complete,
)
from unclip.datasets.shards import iter_shard
from unclip.datasets.storage import StorageLayout


def cfg(**kw) -> IngestConfig:
    base = {
        "samples_per_shard": 64,
        "thread_count": 16,
        "timeout_s": 2.0,
        "max_request_time_s": 3.0,
        "max_image_bytes": 2_000_000,
        "allow_private_networks": True,
        "shard_retries": 0,
        "image_size": 48,
        "resize_mode": "no",
        "encode_format": "png",
        "encode_quality": 1,
        "filters": FilterConfig(
            min_image_size=16,
            max_aspect_ratio=3.0,
            metadata={"punsafe": MetadataRule(lt=0.5)},
        ),
    }
    return IngestConfig(**{**base, **kw})


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/x.png"  # nothing listens: connection refused


def write_csv(path: Path, rows: list[tuple[str, str, float]]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption", "punsafe"])
        w.writerows(rows)
    return str(path)


def snapshot(directory: str) -> dict[str, str]:
    root = Path(directory)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


UNICODE_CAPTION = "a red\ncircle, ünïcödé 🎨 «quoted»"


@pytest.fixture(scope="module")
def ingested(ray_local, bad_server, tmp_path_factory):
    base, state = bad_server
    tmp = tmp_path_factory.mktemp("bad")
    layout = StorageLayout(str(tmp / "store"))
    good = write_csv(
        tmp / "good.csv", [(f"{base}/ok/g{i}.png", f"good {i}", 0.1) for i in range(4)]
    )
    first = ingest_source(layout, good, cfg())
    assert first.successes == 4
    before = snapshot(layout.images_dir(first.source_id))
    rows = [
        ("", "no url", 0.1),
        ("ftp://example.com/a.png", "not http", 0.1),
        (f"{base}/ok/empty-caption.png", "", 0.1),
        (f"{base}/ok/sp ace,1.png", "url with a space and a comma", 0.1),
        (f"{base}/ok/unicode.png", UNICODE_CAPTION, 0.1),
        (f"{base}/ok/unsafe.png", "an unsafe image", 0.9),
        (f"{base}/ok/dup.png", "dup", 0.1),
        (f"{base}/ok/dup.png", "dup", 0.1),  # duplicate within the list
        (f"{base}/ok/g0.png", "good 0", 0.1),  # duplicate of the good list
        (f"{base}/404.png", "not found", 0.1),
        (f"{base}/500.png", "server error", 0.1),
        (closed_port_url(), "refused", 0.1),
        (f"{base}/stall.png", "stalls mid-body", 0.1),
        (f"{base}/endless.png", "never ends", 0.1),
        (f"{base}/drip.png", "drips forever", 0.1),
        (f"{base}/loop.png", "redirect loop", 0.1),
        (f"{base}/notimage.png", "html as png", 0.1),
        (f"{base}/truncated.jpg", "truncated jpeg", 0.1),
        (f"{base}/corrupt.jpg", "corrupt jpeg", 0.1),
        (f"{base}/rgba.png", "rgba", 0.1),
        (f"{base}/palette.png", "palette", 0.1),
        (f"{base}/bomb.png", "20000 x 20000", 0.1),
        (f"{base}/noai.png", "opted out", 0.1),
        (f"{base}/tiny.png", "4 x 4", 0.1),
        (f"{base}/wide.png", "10:1", 0.1),
        (f"{base}/same-a.png", "same bytes a", 0.1),
        (f"{base}/same-b.png", "same bytes b", 0.1),
    ]
    bad = write_csv(tmp / "bad.csv", rows)
    result = ingest_source(layout, bad, cfg())
    yield layout, first, before, result, bad, state


def by_path(layout: StorageLayout, source: str, shard: int = 0) -> dict[str, dict]:
    t = pq.read_table(layout.image_shard(source, shard).replace(".tar", ".parquet"))
    return {r["url"].split("/", 3)[3]: r for r in t.to_pylist()}


def test_bad_rows_get_a_status_and_a_reason(ingested):
    layout, _, _, result, _, _ = ingested
    assert result.failed_shards == {} and result.shards_written == 1
    rows = by_path(layout, result.source_id)
    expect = {
        "ok/sp%20ace,1.png": ("success", None),
        "ok/unicode.png": ("success", None),
        "ok/dup.png": ("success", None),
        "rgba.png": ("success", None),
        "palette.png": ("success", None),
        "404.png": ("failed_to_download", "HTTP Error 404"),  # reasons are regexes
        "500.png": ("failed_to_download", "HTTP Error 500"),
        "stall.png": ("failed_to_download", "timed out|longer than max_request_time_s=3"),
        "endless.png": ("failed_to_download", "larger than max_image_bytes=2000000"),
        "drip.png": ("failed_to_download", "longer than max_request_time_s=3"),
        "loop.png": ("failed_to_download", r"too many redirects \(max_redirects=5\)"),
        "notimage.png": ("failed_to_resize", "image format not recognised"),
        "truncated.jpg": ("failed_to_resize", "truncated image"),
        "corrupt.jpg": ("failed_to_resize", "Image decoding error|image format not recognised"),
        "bomb.png": ("filtered", "filter max_image_area"),
        "noai.png": ("filtered", "filter x_robots_tag"),
        "tiny.png": ("filtered", "filter min_image_size"),
        "wide.png": ("filtered", "filter max_aspect_ratio"),
    }
    refused = [r for p, r in rows.items() if p == "x.png"]
    assert len(refused) == 1 and "Connection refused" in refused[0]["error_message"]
    for path, (status, reason) in expect.items():
        row = rows[path]
        assert row["status"] == status, (path, row["status"], row["error_message"])
        if reason is None:
            assert row["error_message"] is None, (path, row["error_message"])
        else:
            assert re.search(reason, row["error_message"]), (path, row["error_message"])
    # Same bytes twice: the first written (download order) is kept, the other names its key.
    same = sorted((rows["same-a.png"], rows["same-b.png"]), key=lambda r: r["status"])
    assert [r["status"] for r in same] == ["filtered", "success"]
    assert same[0]["error_message"] == f"filter dedup_image_sha256: same image as {same[1]['key']}"
    assert len(rows) == len(expect) + 3  # the rest never reached the shard


def test_pre_download_filters_and_totals(ingested):
    layout, _, _, result, _, state = ingested
    src = result.source_id
    removed = pq.read_table(layout.prefiltered_rows(src)).to_pylist()
    reasons = sorted((r["filter"], r["caption"] or "") for r in removed)
    assert reasons == [
        ("caption_chars", ""),
        ("dedup_url_caption", "dup"),
        ("dedup_url_caption", "good 0"),
        ("invalid_url", "no url"),
        ("invalid_url", "not http"),
        ("metadata:punsafe", "an unsafe image"),
    ]
    assert state.hits["/ok/unsafe.png"] == 0 and state.hits["/ok/empty-caption.png"] == 0
    assert state.hits["/ok/dup.png"] == 1
    in_shard = {
        "max_image_area": 1,
        "x_robots_tag": 1,
        "min_image_size": 1,
        "max_aspect_ratio": 1,
        "dedup_image_sha256": 1,
    }
    before = {"caption_chars": 1, "dedup_url_caption": 2, "invalid_url": 2, "metadata:punsafe": 1}
    shard_stats = json.load(open(layout.image_shard(src, 0).replace(".tar", "_stats.json")))
    assert shard_stats["filtered"] == in_shard and shard_stats["filtered_total"] == 5
    assert (shard_stats["count"], shard_stats["successes"]) == (21, 6)
    assert shard_stats["failed_to_download"] + shard_stats["failed_to_resize"] == 10
    assert "success" in shard_stats["status_dict"]
    assert not any(k.startswith("filter") for k in shard_stats["status_dict"])
    assert result.filtered == {**before, **in_shard}
    summary = json.load(open(layout.ingest_stats(src)))
    assert summary["filtered_total"] == 11 and summary["filtered_before_download"] == before
    assert summary["failure_rate"] == pytest.approx(10 / 16, abs=1e-3)
    # Above the failure-rate threshold: a warning with the top error messages.
    assert result.warnings and "HTTP Error 404" in result.warnings[0]
    assert summary["warning"] == result.warnings[0]
    assert "filtered: x_robots_tag" in format_summary(summary)


def test_samples_written_are_right(ingested):
    layout, _, _, result, _, _ = ingested
    samples = {
        s.meta["url"].rsplit("/", 1)[1]: s
        for s in iter_shard(layout.image_shard(result.source_id, 0))
    }
    names = ["sp%20ace,1.png", "unicode.png", "dup.png", "rgba.png", "palette.png"]
    assert sorted(samples) in (sorted([*names, "same-a.png"]), sorted([*names, "same-b.png"]))
    assert samples["unicode.png"].caption == UNICODE_CAPTION
    rgba = np.asarray(samples["rgba.png"].image, np.int32)  # left red, right transparent -> white
    assert np.abs(rgba[:, :20] - [255, 0, 0]).max() <= 2
    assert np.abs(rgba[:, 28:] - [255, 255, 255]).max() <= 2
    pal = np.asarray(samples["palette.png"].image, np.int32)  # top transparent, bottom green
    assert np.abs(pal[:20] - [255, 255, 255]).max() <= 2
    assert np.abs(pal[28:] - [0, 200, 0]).max() <= 2


def test_existing_shards_untouched_and_rerun_does_nothing(ingested):
    layout, first, before, result, bad, state = ingested
    assert snapshot(layout.images_dir(first.source_id)) == before
    hits = dict(state.hits)
    again = ingest_source(layout, bad, cfg())
    assert (again.shards_written, again.shards_skipped) == (0, 1)
    assert dict(state.hits) == hits
    assert source_complete(layout, bad, cfg())


def test_wrong_column_fails_before_any_download(bad_server, tmp_path):
    base, state = bad_server
    path = tmp_path / "l.csv"
    path.write_text(f"URL,caption\n{base}/ok/wrong.png,x\n")
    with pytest.raises(ValueError, match=r"missing column 'url' \(ingest.url_col\)") as e:
        ingest_source(StorageLayout(str(tmp_path / "store")), str(path), cfg())
    assert str(path) in str(e.value)
    assert state.hits["/ok/wrong.png"] == 0 and not (tmp_path / "store").exists()


def test_metadata_address_refused_with_safety_on(ray_local, tmp_path):
    url_list = str(tmp_path / "l.parquet")
    pq.write_table(
        pa.table({"url": ["http://169.254.169.254/latest/meta-data/iam"], "caption": ["creds"]}),
        url_list,
    )
    layout = StorageLayout(str(tmp_path / "store"))
    result = ingest_source(layout, url_list, cfg(allow_private_networks=False))
    row = by_path(layout, result.source_id)["latest/meta-data/iam"]
    assert row["status"] == "failed_to_download"
    assert "refused: 169.254.169.254" in row["error_message"]


def test_retry_failed_writes_new_shards_only(ray_local, bad_server, tmp_path):
    base, state = bad_server
    layout = StorageLayout(str(tmp_path / "store"))
    rows = [(f"{base}/flaky/r{i}.png", f"flaky {i}", 0.1) for i in range(3)]
    rows += [(f"{base}/ok/r-ok.png", "fine", 0.1), (f"{base}/404.png", "gone", 0.1)]
    url_list = write_csv(tmp_path / "flaky.csv", rows)
    c = cfg(samples_per_shard=4)
    first = ingest_source(layout, url_list, c)
    src = first.source_id
    assert (first.shards_total, first.successes, first.failures) == (2, 1, 4)
    before = snapshot(layout.images_dir(src))
    retry = retry_failed(layout, src, c)
    assert (retry.shards_written, retry.successes, retry.failures) == (1, 3, 1)
    assert completed_shards(layout, src) == [0, 1, 2]
    after = snapshot(layout.images_dir(src))
    assert {k: v for k, v in after.items() if k in before and not k.startswith("_")} == {
        k: v for k, v in before.items() if not k.startswith("_")
    }
    new = by_path(layout, src, 2)
    assert {p: r["status"] for p, r in new.items()} == {
        "flaky/r0.png": "success",
        "flaky/r1.png": "success",
        "flaky/r2.png": "success",
        "404.png": "failed_to_download",
    }
    assert all(r["retry_of"] for r in new.values())
    hits = state.hits["/404.png"]
    again = retry_failed(layout, src, c)  # only the 404 (now in shard 2) is left to retry
    assert (again.shards_written, again.successes, again.failures) == (1, 0, 1)
    assert state.hits["/404.png"] == hits + 1
    assert by_path(layout, src, 3)["404.png"]["retry_of"] == new["404.png"]["key"]
