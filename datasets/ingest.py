"""Ingest: a URL list becomes webdataset shards, one Ray task per shard running img2dataset's Downloader.

Plan: the list is copied to ``sources/{source}.parquet`` and split into fixed slices of
``samples_per_shard`` rows (the split is recorded in ``_plan.json`` and may not change later).
Each missing shard is one Ray task: it copies its input slice from the storage root, runs
img2dataset's ``Downloader`` (``Resizer`` + ``WebDatasetSampleWriter``) into a worker-local
temp dir, then commits ``.parquet``, ``_stats.json`` and finally ``.tar`` to the storage root,
each atomically. A shard exists only when its tar exists, so a killed task leaves nothing a
reader takes, and a re-run redoes exactly the missing shards. Failed samples are rows in the
shard's Parquet (status + error message); a failed shard task is retried by Ray.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from fsspec.core import url_to_fs

from .config import IngestConfig
from .netguard import guarded_urlopen
from .shards import completed_shards
from .storage import StorageLayout, atomic_write, exists, read_json, write_json
from .url_lists import read_url_list, source_id

log = logging.getLogger(__name__)

OOM_SHARD_COUNT = 5  # shard names are {shard:05d}, as StorageLayout.image_shard
# Failure messages that mean "the host or the network was down", not "this URL is bad".
_TRANSIENT = (
    "connection refused",
    "timed out",
    "temporary failure in name resolution",
    "unreachable",
)


class ShardError(RuntimeError):
    """A shard task failed as a whole (Ray retries it)."""


@dataclass
class IngestResult:
    source_id: str
    shards_total: int
    shards_written: int
    shards_skipped: int
    successes: int  # in shards written by this run
    failures: int  # in shards written by this run
    stats: dict[str, Any] = field(default_factory=dict)
    failed_shards: dict[int, str] = field(default_factory=dict)  # shard -> error, after Ray retries


def shard_stats_path(layout: StorageLayout, source: str, shard: int) -> str:
    return layout.image_shard(source, shard)[: -len(".tar")] + "_stats.json"


def shard_parquet_path(layout: StorageLayout, source: str, shard: int) -> str:
    return layout.image_shard(source, shard)[: -len(".tar")] + ".parquet"


def _put(local: str, remote: str) -> None:
    with open(local, "rb") as src, atomic_write(remote) as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)


def _make_downloader(cfg: IngestConfig, output_folder: str, column_list: list[str]) -> Any:
    # img2dataset imports albumentations, which otherwise phones home for updates on import.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    resizer = Resizer(
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=False,
        encode_quality=cfg.encode_quality,
        encode_format=cfg.encode_format,
    )
    return Downloader(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=resizer,
        thread_count=cfg.thread_count,
        save_caption=True,
        extract_exif=False,
        output_folder=output_folder,
        column_list=column_list,
        timeout=cfg.timeout_s,
        number_sample_per_shard=cfg.samples_per_shard,
        oom_shard_count=OOM_SHARD_COUNT,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format=cfg.encode_format,
        retries=cfg.retries,
        user_agent_token=None,
        # img2dataset's default opt-outs (X-Robots-Tag), honoured.
        disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
    )


def _all_transient(stats: dict[str, Any]) -> bool:
    """Every row failed, all with network-down errors: retry the shard rather than commit it."""
    if stats["count"] == 0 or stats["successes"] > 0:
        return False
    reasons = [r.lower() for r in stats.get("status_dict", {}) if r != "success"]
    return bool(reasons) and all(any(t in r for t in _TRANSIENT) for r in reasons)


def download_shard(root: str, source: str, shard: int, cfg: IngestConfig) -> dict[str, Any]:
    """Download, resize and commit one shard; returns img2dataset's stats for it."""
    layout = StorageLayout(root)
    tar_path = layout.image_shard(source, shard)
    if exists(tar_path):  # committed by an earlier attempt
        return read_json(shard_stats_path(layout, source, shard))
    in_fs, in_path = url_to_fs(layout.shard_input(source, shard))
    with tempfile.TemporaryDirectory(prefix="unclip-ingest-") as tmp:
        local_input = os.path.join(tmp, "input.feather")
        in_fs.get(in_path, local_input)
        with pa.memory_map(local_input) as f:
            column_list = pa.ipc.open_file(f).schema.names
        out = os.path.join(tmp, "out")
        os.makedirs(out)
        downloader = _make_downloader(cfg, out, column_list)
        with guarded_urlopen(cfg.allow_private_networks):
            ok, _ = downloader((shard, local_input))  # img2dataset removes local_input when done
        name = f"{shard:0{OOM_SHARD_COUNT}d}"
        stats_file = os.path.join(out, f"{name}_stats.json")
        if not ok or not os.path.exists(stats_file):
            raise ShardError(f"{source}/{name}: img2dataset's downloader failed (see worker log)")
        with open(stats_file) as f:
            stats = json.load(f)
        if _all_transient(stats):
            raise ShardError(f"{source}/{name}: every download failed: {stats['status_dict']}")
        _put(os.path.join(out, f"{name}.parquet"), shard_parquet_path(layout, source, shard))
        _put(stats_file, shard_stats_path(layout, source, shard))
        _put(os.path.join(out, f"{name}.tar"), tar_path)  # last: the shard now exists
    in_fs.rm(in_path)
    return stats


_download_shard_task = ray.remote(num_cpus=1, retry_exceptions=True)(download_shard)


def _check_plan(layout: StorageLayout, source: str, num_rows: int, cfg: IngestConfig) -> int:
    plan = {"num_rows": num_rows, "samples_per_shard": cfg.samples_per_shard}
    path = layout.ingest_plan(source)
    if exists(path):
        old = read_json(path)
        if old != plan:
            raise ValueError(
                f"source {source} was split with {old}, now {plan}: samples_per_shard cannot "
                f"change for an ingested source (see {path})"
            )
    else:
        write_json(path, plan)
    return math.ceil(num_rows / cfg.samples_per_shard)


def _write_inputs(
    layout: StorageLayout, source: str, table: pa.Table, shards: list[int], n: int
) -> None:
    for shard in shards:
        part = table.slice(shard * n, n)
        with (
            atomic_write(layout.shard_input(source, shard)) as f,
            pa.ipc.new_file(f, part.schema) as w,
        ):
            w.write_table(part)


def _summary(run_stats: dict[int, dict[str, Any]], duration: float) -> dict[str, Any]:
    reasons: Counter[str] = Counter()
    count = successes = failed_download = failed_resize = 0
    for s in run_stats.values():
        count += s["count"]
        successes += s["successes"]
        failed_download += s["failed_to_download"]
        failed_resize += s["failed_to_resize"]
        reasons.update({k: v for k, v in s.get("status_dict", {}).items() if k != "success"})
    return {
        "count": count,
        "successes": successes,
        "failed_to_download": failed_download,
        "failed_to_resize": failed_resize,
        "failure_reasons": dict(reasons.most_common(20)),
        "duration_s": round(duration, 3),
        "images_per_s": round(successes / duration, 2) if duration > 0 else None,
    }


@dataclass
class SourcePlan:
    source_id: str
    num_rows: int
    shards_total: int
    pending: list[int]  # shards without a committed tar; their input slices are written


def plan_source(layout: StorageLayout, url_list: str, cfg: IngestConfig) -> SourcePlan:
    """Read and check a list, record its copy and shard split, write input slices of missing shards."""
    table = read_url_list(url_list, cfg)  # bad columns fail here, before any download
    source = source_id(url_list)
    if not exists(layout.source_list(source)):
        with atomic_write(layout.source_list(source)) as f:
            pq.write_table(table, f)
    total = _check_plan(layout, source, table.num_rows, cfg)
    done = set(completed_shards(layout, source))
    pending = [s for s in range(total) if s not in done]
    _write_inputs(layout, source, table, pending, cfg.samples_per_shard)
    return SourcePlan(source, table.num_rows, total, pending)


def ingest_source(
    layout: StorageLayout,
    url_list: str,
    cfg: IngestConfig,
    progress: Callable[[int, int], None] | None = None,
) -> IngestResult:
    """Ingest one URL list (one source) into shards; only missing shards are downloaded."""
    plan = plan_source(layout, url_list, cfg)
    source, total, pending = plan.source_id, plan.shards_total, plan.pending
    result = IngestResult(source, total, 0, total - len(pending), 0, 0)
    if progress:
        progress(total - len(pending), total)
    if not pending:
        return result

    start = time.time()
    task = _download_shard_task.options(max_retries=cfg.shard_retries)
    refs = {task.remote(layout.root, source, s, cfg): s for s in pending}
    run_stats: dict[int, dict[str, Any]] = {}
    remaining = list(refs)
    while remaining:
        ready, remaining = ray.wait(remaining, num_returns=1)
        shard = refs[ready[0]]
        try:
            run_stats[shard] = ray.get(ready[0])
        except Exception as e:  # after Ray's retries: report, keep the other shards
            result.failed_shards[shard] = f"{type(e).__name__}: {e}"[:2000]
            log.error("ingest %s shard %05d failed: %s", source, shard, e)
        if progress:
            progress(result.shards_skipped + len(run_stats) + len(result.failed_shards), total)

    summary = _summary(run_stats, time.time() - start)
    result.shards_written = len(run_stats)
    result.successes = summary["successes"]
    result.failures = summary["failed_to_download"] + summary["failed_to_resize"]
    result.stats = {
        "source_id": source,
        "url_list": url_list,
        "shards_total": total,
        "shards_written": result.shards_written,
        "shards_skipped": result.shards_skipped,
        "failed_shards": {f"{k:05d}": v for k, v in result.failed_shards.items()},
        **summary,
    }
    write_json(layout.ingest_stats(source), result.stats)
    return result
