"""Ingest on a local Ray: real HTTP through img2dataset's Downloader, atomic shards, idempotence."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unclip.datasets.config import IngestConfig, SyntheticConfig
from unclip.datasets.ingest import completed_shards, download_shard, ingest_source
from unclip.datasets.shards import iter_shard
from unclip.datasets.source_plan import plan_source
from unclip.datasets.storage import StorageLayout
from unclip.datasets.synthetic import (
    render_image,
    serve_synthetic,
    shape_caption,
    write_url_list,
)

SYN = SyntheticConfig(num_pairs=60, image_size=96, seed=1)


def ingest_cfg(**kw) -> IngestConfig:
    base = {"thread_count": 4, "timeout_s": 5.0, "allow_private_networks": True, "shard_retries": 0}
    return IngestConfig(**{**base, "samples_per_shard": 20, **kw})


CFG = ingest_cfg(samples_per_shard=25, image_size=64)


def _files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def ingested(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest")
    layout = StorageLayout(str(root / "store"))
    url_list = str(root / "shapes.parquet")
    calls: list[tuple[int, int]] = []
    logger = logging.getLogger("unclip.datasets.ingest")
    lines = ListHandler()
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.INFO)
    with serve_synthetic(SYN) as base:  # served while the tests run: some ingest again
        write_url_list(SYN, base, url_list)
        try:
            result = ingest_source(
                layout, url_list, CFG, progress=lambda d, t: calls.append((d, t))
            )
        finally:
            logger.removeHandler(lines)
            logger.setLevel(level)
        yield layout, url_list, result, (calls, lines.messages)


class ListHandler(logging.Handler):
    """The messages logged while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_ingest_writes_complete_shards(ingested):
    layout, _, result, (calls, messages) = ingested
    assert (result.shards_total, result.shards_written, result.shards_skipped) == (3, 3, 0)
    assert (result.successes, result.failures, result.failed_shards) == (60, 0, {})
    assert calls[0] == (0, 3) and calls[-1] == (3, 3)
    # progress as log lines too (what a log file or `kubectl logs` shows), one per shard
    src = result.source_id
    done = [m.split(", ") for m in messages if m.startswith(f"ingest {src}: ")]
    assert [d[0] for d in done] == [
        f"ingest {src}: {i}/3 shards done (0 failed)" for i in (1, 2, 3)
    ]
    images = [int(d[1].removesuffix(" images")) for d in done]
    assert images == sorted(images) and images[-1] == 60
    assert all(float(d[2].removesuffix(" images/s")) > 0 for d in done)
    src = result.source_id
    assert completed_shards(layout, src) == [0, 1, 2]
    for shard, n in [(0, 25), (1, 25), (2, 10)]:
        with tarfile.open(layout.image_shard(src, shard)) as tar:
            names = tar.getnames()
        assert len(names) == 3 * n
        assert {n.split(".", 1)[1] for n in names} == {"jpg", "txt", "json"}
        stats = json.load(open(layout.image_shard(src, shard).replace(".tar", "_stats.json")))
        assert stats["count"] == n and stats["successes"] == n
        meta = pq.read_table(layout.image_shard(src, shard).replace(".tar", ".parquet"))
        assert meta.num_rows == n and set(meta.column("status").to_pylist()) == {"success"}
        assert {"color", "shape", "sha256"} <= set(meta.column_names)  # extra columns carried
    for s in iter_shard(layout.image_shard(src, 1)):
        assert s.image.size == (64, 64)
        index = int(s.meta["url"].rsplit("/", 1)[1].split(".")[0])
        assert s.caption == shape_caption(s.meta["color"], s.meta["shape"])
        expected = render_image(SYN, index).resize((64, 64), Image.Resampling.BOX)
        diff = np.abs(np.asarray(s.image, np.float32) - np.asarray(expected, np.float32)).mean()
        assert diff < 8, (s.key, diff)
    summary = json.load(open(layout.ingest_stats(src)))
    assert summary["successes"] == 60 and summary["shards_written"] == 3
    assert os.path.exists(layout.source_list(src))
    assert not list(Path(layout.shard_inputs_dir(src)).glob("*"))  # inputs cleaned after commit


def test_rerun_does_no_work(ingested):
    layout, url_list, result, _ = ingested
    before = _files(Path(layout.root))
    with serve_synthetic(SYN, port=0):  # a server on another port: nothing may be fetched anyway
        again = ingest_source(layout, url_list, CFG)
    assert (again.shards_written, again.shards_skipped, again.successes) == (0, 3, 0)
    assert _files(Path(layout.root)) == before


def test_killed_shard_is_ignored_then_redone(ingested):
    layout, url_list, result, _ = ingested
    src = result.source_id
    tar1 = Path(layout.image_shard(src, 1))
    members = tarfile.open(tar1).getnames()
    # a task killed mid-commit: sidecars written, the tar only as a temporary
    tar1.rename(tar1.with_name(tar1.name + ".tmp-deadbeef"))
    assert completed_shards(layout, src) == [0, 2]
    before = _files(Path(layout.root))
    again = ingest_source(layout, url_list, CFG)  # the fixture's server is still up
    assert (again.shards_written, again.shards_skipped, again.successes) == (1, 2, 25)
    after = _files(Path(layout.root))
    for shard in (0, 2):
        key = str(Path(layout.image_shard(src, shard)).relative_to(layout.root))
        assert after[key] == before[key]
    assert sorted(tarfile.open(tar1).getnames()) == sorted(members)


def test_wrong_column_fails_before_any_download(ray_local, tmp_path):
    layout = StorageLayout(str(tmp_path / "store"))
    url_list = str(tmp_path / "l.parquet")
    write_url_list(SYN, "http://127.0.0.1:9", url_list)
    with pytest.raises(ValueError) as e:
        ingest_source(layout, url_list, ingest_cfg(caption_col="TEXT"))
    assert url_list in str(e.value) and "'TEXT'" in str(e.value)
    assert not (tmp_path / "store").exists()


def test_private_urls_refused_without_allow_private_networks(ray_local, tmp_path):
    syn = SyntheticConfig(num_pairs=5, image_size=32)
    layout = StorageLayout(str(tmp_path / "store"))
    url_list = str(tmp_path / "l.parquet")
    with serve_synthetic(syn) as base:
        write_url_list(syn, base, url_list)
        result = ingest_source(layout, url_list, ingest_cfg(allow_private_networks=False))
    assert (result.shards_written, result.successes, result.failures) == (1, 0, 5)
    meta = pq.read_table(layout.image_shard(result.source_id, 0).replace(".tar", ".parquet"))
    assert set(meta.column("status").to_pylist()) == {"failed_to_download"}
    assert all("refused: 127.0.0.1" in m for m in meta.column("error_message").to_pylist())
    assert any("refused" in r for r in result.stats["failure_reasons"])
    assert list(iter_shard(layout.image_shard(result.source_id, 0))) == []


def test_server_down_fails_the_shard_without_committing(ray_local, tmp_path):
    syn = SyntheticConfig(num_pairs=4, image_size=32)
    with serve_synthetic(syn) as base:
        pass  # the port is now closed: connection refused
    layout = StorageLayout(str(tmp_path / "store"))
    url_list = str(tmp_path / "l.parquet")
    write_url_list(syn, base, url_list)
    result = ingest_source(layout, url_list, ingest_cfg())
    assert result.shards_written == 0 and list(result.failed_shards) == [0]
    assert "every download failed" in result.failed_shards[0]
    assert completed_shards(layout, result.source_id) == []
    with pytest.raises(ValueError, match="samples_per_shard cannot change"):
        ingest_source(layout, url_list, ingest_cfg(samples_per_shard=2))


def _list(path, urls: list[str]) -> str:
    pq.write_table(
        pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}), path
    )
    return str(path)


@pytest.mark.timeout(120)
def test_shard_deadline_ends_a_try_stalled_on_a_server_that_never_answers(
    ray_local, bad_server, tmp_path
):
    base, state = bad_server
    paths = [f"/hang/{i}.png" for i in range(40)]  # more than 2 x thread_count in flight
    url_list = _list(tmp_path / "hang.parquet", [base + p for p in paths])
    layout = StorageLayout(str(tmp_path / "store"))
    cfg = ingest_cfg(
        samples_per_shard=40,
        thread_count=2,
        shard_deadline_s=2.0,
        timeout_s=30.0,
        max_request_time_s=30.0,
    )
    start = time.monotonic()
    result = ingest_source(layout, url_list, cfg)
    elapsed = time.monotonic() - start
    assert list(result.failed_shards) == [0], result.failed_shards
    assert "2 s deadline and was killed" in result.failed_shards[0]
    assert elapsed < 2.0 + 20, elapsed  # the deadline, the child's imports, Ray
    src = result.source_id
    assert completed_shards(layout, src) == []
    assert not list(Path(layout.images_dir(src)).glob("00000*"))  # no part of the shard
    hits = sum(state.hits[p] for p in paths)
    assert 1 <= hits <= 4  # two threads, each on its first URL
    time.sleep(1.5)
    assert sum(state.hits[p] for p in paths) == hits  # the killed try sends nothing more


KILLED_TASK = textwrap.dedent(
    """
    import sys
    from unclip.datasets.config import IngestConfig
    from unclip.datasets.shard_task import download_shard
    from unclip.datasets.source_plan import plan_source
    from unclip.datasets.storage import StorageLayout

    root, url_list, cfg = sys.argv[1], sys.argv[2], IngestConfig.model_validate_json(sys.argv[3])
    plan = plan_source(StorageLayout(root), url_list, cfg)
    download_shard(root, plan.source_id, 0, cfg)
    """
)


@pytest.mark.timeout(180)
def test_a_killed_shard_task_takes_its_download_process_with_it(bad_server, tmp_path):
    """A worker killed mid-try (OOM, node loss) leaves no download process behind: the try's
    child and the fork server it came from end with the shard task's process."""
    base, state = bad_server
    paths = [f"/hang/killed-{i}.png" for i in range(10)]
    url_list = _list(tmp_path / "killed.parquet", [base + p for p in paths])
    cfg = ingest_cfg(samples_per_shard=10, thread_count=2, shard_deadline_s=120.0, timeout_s=120.0)
    task = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED_TASK,
            str(tmp_path / "store"),
            url_list,
            cfg.model_dump_json(),
        ]
    )
    try:
        deadline = time.monotonic() + 120
        while sum(state.hits[p] for p in paths) == 0:  # the try's child is downloading
            assert task.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        family = psutil.Process(task.pid).children(recursive=True)
        assert family  # the fork server and the try
    finally:
        task.kill()
        task.wait()

    def running() -> list[psutil.Process]:
        alive = []
        for p in family:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        return alive

    end = time.monotonic() + 15
    while running() and time.monotonic() < end:
        time.sleep(0.2)
    assert running() == []


@pytest.mark.parametrize("keep", [0, 0.5])
def test_a_zero_length_or_torn_tar_under_its_final_name_is_redone(ingested, keep):
    layout, url_list, result, _ = ingested
    src = result.source_id
    tar2 = Path(layout.image_shard(src, 2))
    whole = tar2.read_bytes()
    tar2.write_bytes(whole[: int(len(whole) * keep)])  # what a power loss leaves without fsync
    assert completed_shards(layout, src) == [0, 1]
    again = ingest_source(layout, url_list, CFG)
    assert (again.shards_written, again.successes) == (1, 10)
    assert completed_shards(layout, src) == [0, 1, 2]
    assert len(tarfile.open(tar2).getnames()) == 3 * 10


def test_two_concurrent_tries_of_a_shard_commit_one_consistent_unit(bad_server, tmp_path):
    base, state = bad_server
    paths = [f"/slow/{i}.png" for i in range(6)]
    url_list = _list(tmp_path / "slow.parquet", [base + p for p in paths])
    layout = StorageLayout(str(tmp_path / "store"))
    cfg = ingest_cfg(samples_per_shard=6, thread_count=2)
    plan = plan_source(layout, url_list, cfg)
    results: list[dict] = []

    def one_try() -> None:
        results.append(download_shard(layout.root, plan.source_id, 0, cfg))

    tries = [threading.Thread(target=one_try) for _ in range(2)]
    for t in tries:
        t.start()
        time.sleep(0.3)
    for t in tries:
        t.join(timeout=120)
    assert len(results) == 2 and results[0]["commit"] == results[1]["commit"]
    assert [state.hits[p] for p in paths] == [1] * 6  # the second try downloaded nothing
    # the unit on storage is the one try's: sizes as recorded, tar rows = Parquet successes
    src = plan.source_id
    record = json.load(open(layout.image_shard_stats(src, 0)))["commit"]
    assert record == results[0]["commit"]
    assert os.path.getsize(layout.image_shard(src, 0)) == record["tar"]["bytes"]
    assert os.path.getsize(layout.image_shard_parquet(src, 0)) == record["parquet"]["bytes"]
    table = pq.read_table(layout.image_shard_parquet(src, 0))
    in_tar = {s.key: s.meta["sha256"] for s in iter_shard(layout.image_shard(src, 0))}
    keys, hashes = table.column("key").to_pylist(), table.column("sha256").to_pylist()
    assert in_tar == dict(zip(keys, hashes, strict=True))


def test_two_concurrent_first_plans_of_a_source_agree(tmp_path):
    """The plan lease: one writer fixes the rows and the split, the other reads what it fixed."""
    urls = [f"http://127.0.0.1:9/{i}.png" for i in range(30)]
    url_list = _list(tmp_path / "l.parquet", urls)
    layout = StorageLayout(str(tmp_path / "store"))
    strict = ingest_cfg(samples_per_shard=10, filters={"caption_min_words": 3})  # drops some
    loose = ingest_cfg(samples_per_shard=10)
    plans: dict[str, object] = {}
    errors: list[BaseException] = []

    def plan(name, cfg) -> None:
        try:
            plans[name] = plan_source(layout, url_list, cfg)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=plan, args=a) for a in (("s", strict), ("l", loose))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert plans["s"].num_rows == plans["l"].num_rows  # one plan, whoever made it
    fixed = json.load(open(layout.ingest_plan(plans["s"].source_id)))
    assert fixed["num_rows"] == plans["s"].num_rows
    assert pq.read_table(layout.ingest_rows(plans["s"].source_id)).num_rows == fixed["num_rows"]
