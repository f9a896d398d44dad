"""Ingest: a URL list becomes webdataset shards, one Ray task per shard running img2dataset's Downloader.

Plan: the list is copied to ``sources/{source}.parquet`` and split into fixed slices of
``samples_per_shard`` rows (the split is recorded in ``_plan.json`` and may not change later).
Each missing shard is one Ray task (``shard_task.py``): under the shard's lease it copies its
input slice from the storage root, runs img2dataset's ``Downloader`` in a child process that is
killed at ``shard_deadline_s`` (``shard_child.py``), then commits ``.parquet``, ``_stats.json``
(with a commit record) and finally ``.tar``, each durably. A shard exists only when its tar
matches its commit record, so a killed task leaves nothing a reader takes, and a re-run redoes
exactly the missing shards. Failed samples are rows in the shard's Parquet (status + error
message); a failed shard task is retried by Ray, and the driver's wait is bounded too.

Filters: at the first plan of a source the pre-download filters (``filters.py``) and the
(url, caption) dedup against every source already indexed (``dedup.py``) run in the driver; the
rows kept are fixed in ``_rows.parquet`` (the removed ones, with their reason, in
``_prefiltered.parquet``) and the shards slice them. Image filters run inside the shard task
(``image_filters.py``). :func:`retry_failed` re-downloads the failed rows of finished shards into
new shards numbered after the planned ones, never rewriting a committed shard.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from fsspec.core import url_to_fs

from . import dedup
from .config import IngestConfig
from .filters import prefilter
from .image_filters import FILTERED
from .ingest_stats import failure_warning, format_summary, summarize
from .lease import Lease, LeaseHeld
from .ray_runtime import ensure_started
from .shard_child import STARTUP_S
from .shard_task import ShardDeadlineExceeded, ShardError, download_shard, lease_wait_s
from .shards import completed_shards
from .storage import StorageLayout, atomic_write, exists, read_json, write_json
from .url_lists import read_url_list, source_id

__all__ = [
    "IngestFailed",
    "IngestResult",
    "ShardDeadlineExceeded",
    "ShardError",
    "download_shard",
    "completed_shards",
    "format_summary",
    "ingest_source",
    "plan_source",
    "retry_failed",
    "source_complete",
]

log = logging.getLogger(__name__)


class ShardStalled(ShardError):
    """The driver saw no shard finish for longer than any try may take; the rest were cancelled."""


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
    filtered: dict[str, int] = field(default_factory=dict)  # filter -> rows removed
    warnings: list[str] = field(default_factory=list)

    def raise_for_failed_shards(self) -> None:
        """Raise ``IngestFailed`` naming every shard that failed after Ray's retries.

        The shards that were downloaded are committed and kept; the next run retries only these.
        """
        if self.failed_shards:
            lines = [
                f"  source {self.source_id} shard {n:05d}: {err}"
                for n, err in self.failed_shards.items()
            ]
            raise IngestFailed(
                "shards failed after Ray retries (re-run to retry them):\n" + "\n".join(lines)
            )


class IngestFailed(RuntimeError):
    """Some shards could not be downloaded; the ones that were are committed and kept."""


def shard_stats_path(layout: StorageLayout, source: str, shard: int) -> str:
    return layout.image_shard_stats(source, shard)


def shard_parquet_path(layout: StorageLayout, source: str, shard: int) -> str:
    return layout.image_shard_parquet(source, shard)


PLAN_WAIT_S = 600.0  # how long a first plan waits for another writer planning the same source
# Slack on top of a try's longest life before the driver gives up on a task: the input copy,
# the commit, Ray's retry scheduling.
_DRIVER_SLACK_S = 120.0


def driver_bound(cfg: IngestConfig) -> float | None:
    """Longest the driver waits for the next shard to finish; None without a shard deadline.

    The oldest running task ends within (lease wait + start-up + deadline + slack) per try, all
    tries included, so no completion for that long means a task is stuck past its child's kill.
    """
    if cfg.shard_deadline_s is None:
        return None
    per_try = lease_wait_s(cfg) + STARTUP_S + cfg.shard_deadline_s + _DRIVER_SLACK_S
    return per_try * (cfg.shard_retries + 1)


_download_shard_task = ray.remote(num_cpus=1, retry_exceptions=True)(download_shard)


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


@dataclass
class SourcePlan:
    source_id: str
    num_rows: int  # rows kept by the pre-download filters: what the shards slice
    shards_total: int
    pending: list[int]  # shards without a committed tar; their input slices are written
    filtered: dict[str, int] = field(default_factory=dict)  # pre-download removals


def _read_parquet(path: str) -> pa.Table:
    fs, p = url_to_fs(path)
    with fs.open(p, "rb") as f:
        return pq.read_table(f)


def _write_parquet(path: str, table: pa.Table) -> None:
    with atomic_write(path) as f:
        pq.write_table(table, f)


def _filter_rows(
    layout: StorageLayout, source: str, table: pa.Table, cfg: IngestConfig, url_list: str
) -> tuple[pa.Table, pa.Table, dict[str, int], list[str]]:
    """(kept, removed, counts, notes): pre-download filters, then (url, caption) dedup."""
    pf = prefilter(table, cfg.filters, url_list)
    kept, removed, counts = pf.kept, pf.removed, dict(pf.counts)
    if cfg.filters.dedup_url_caption:
        hashes = dedup.url_caption_hashes(
            kept.column("url").to_pylist(), kept.column("caption").to_pylist()
        )
        dup = dedup.duplicates(hashes, dedup.load_index(layout, exclude=source))
        if dup.any():
            mask = pa.array(dup)
            gone = kept.filter(mask)
            gone = gone.append_column("filter", pa.array(["dedup_url_caption"] * len(gone)))
            removed = pa.concat_tables([removed, gone])
            counts["dedup_url_caption"] = int(dup.sum())
            kept = kept.filter(pc.invert(mask))
        dedup.record_source(layout, source, hashes[~dup])
    return kept, removed, counts, pf.notes


def _first_plan(
    layout: StorageLayout, source: str, table: pa.Table, cfg: IngestConfig, url_list: str
) -> None:
    kept, removed, counts, notes = _filter_rows(layout, source, table, cfg, url_list)
    _write_parquet(layout.prefiltered_rows(source), removed)
    _write_parquet(layout.ingest_rows(source), kept)
    plan = {
        "num_rows": kept.num_rows,
        "samples_per_shard": cfg.samples_per_shard,
        "list_rows": table.num_rows,
        "filtered_before_download": counts,
        "notes": notes,
    }
    write_json(layout.ingest_plan(source), plan)  # last: the commit of the plan


def plan_source(layout: StorageLayout, url_list: str, cfg: IngestConfig) -> SourcePlan:
    """Read and check a list; at first sight filter it and fix its split; write missing inputs.

    The rows kept and the split are fixed the first time (``_plan.json`` is written last, as the
    commit), by the one writer holding the source's plan lease: later filter settings, sources or
    concurrent runs never change an ingested source's shards.
    """
    table = read_url_list(url_list, cfg)  # bad columns fail here, before any download
    source = source_id(url_list)
    if not exists(layout.source_list(source)):
        _write_parquet(layout.source_list(source), table)
    plan_path = layout.ingest_plan(source)
    if not exists(plan_path):
        lease = Lease(layout.lease("images", source, "plan"), f"the first plan of source {source}")
        try:
            with lease.hold(wait_s=PLAN_WAIT_S):
                if not exists(plan_path):  # else another writer planned it while we waited
                    _first_plan(layout, source, table, cfg, url_list)
        except LeaseHeld as e:
            raise RuntimeError(f"source {source}: cannot plan it: {e}") from None
    plan = read_json(plan_path)
    new = {"num_rows": plan["num_rows"], "samples_per_shard": cfg.samples_per_shard}
    if plan["samples_per_shard"] != cfg.samples_per_shard:
        old = {"num_rows": plan["num_rows"], "samples_per_shard": plan["samples_per_shard"]}
        raise ValueError(
            f"source {source} was split with {old}, now {new}: samples_per_shard cannot "
            f"change for an ingested source (see {plan_path})"
        )
    # Plans from before filters existed sliced the whole list.
    rows_path = layout.ingest_rows(source)
    kept = _read_parquet(rows_path) if exists(rows_path) else table
    if kept.num_rows != plan["num_rows"]:
        raise ValueError(f"{rows_path}: {kept.num_rows} rows, {plan_path} says {plan['num_rows']}")
    counts = plan.get("filtered_before_download", {})
    total = math.ceil(kept.num_rows / cfg.samples_per_shard)
    done = set(completed_shards(layout, source))
    pending = [s for s in range(total) if s not in done]
    _write_inputs(layout, source, kept, pending, cfg.samples_per_shard)
    return SourcePlan(source, kept.num_rows, total, pending, counts)


def source_complete(layout: StorageLayout, url_list: str, cfg: IngestConfig) -> bool:
    """True when every planned shard of the list's source is committed (no download needed)."""
    return source_ingested(layout, source_id(url_list))


def source_ingested(layout: StorageLayout, source: str) -> bool:
    """True when source ``source`` has an ingest plan and every planned shard is committed."""
    if not exists(layout.ingest_plan(source)):
        return False
    plan = read_json(layout.ingest_plan(source))
    total = math.ceil(plan["num_rows"] / plan["samples_per_shard"])
    return set(range(total)) <= set(completed_shards(layout, source))


def _run_shards(
    layout: StorageLayout,
    source: str,
    shards: list[int],
    cfg: IngestConfig,
    result: IngestResult,
    progress: Callable[[int, int], None] | None,
) -> dict[int, dict[str, Any]]:
    """One Ray task per shard; failed shards (after Ray's retries) go to ``result.failed_shards``."""
    ensure_started()
    task = _download_shard_task.options(max_retries=cfg.shard_retries)
    refs = {task.remote(layout.root, source, s, cfg): s for s in shards}
    run_stats: dict[int, dict[str, Any]] = {}
    remaining = list(refs)
    bound = driver_bound(cfg)
    while remaining:
        ready, remaining = ray.wait(remaining, num_returns=1, timeout=bound)
        if not ready:  # nothing finished for longer than any try may take: end them for certain
            for ref in remaining:
                ray.cancel(ref, force=True)
                result.failed_shards[refs[ref]] = (
                    f"ShardStalled: no shard of {source} finished within {bound:g} s "
                    "(ingest.shard_deadline_s, retries and slack); the task was cancelled"
                )
            log.error(
                "ingest %s: %d shard task(s) stalled and were cancelled", source, len(remaining)
            )
            break
        shard = refs[ready[0]]
        try:
            run_stats[shard] = ray.get(ready[0])
        except Exception as e:  # after Ray's retries: report, keep the other shards
            result.failed_shards[shard] = f"{type(e).__name__}: {e}"[:2000]
            log.error("ingest %s shard %05d failed: %s", source, shard, e)
        if progress:
            progress(
                result.shards_skipped + len(run_stats) + len(result.failed_shards),
                result.shards_total,
            )
    return run_stats


def _finish(
    layout: StorageLayout,
    result: IngestResult,
    run_stats: dict[int, dict[str, Any]],
    start: float,
    cfg: IngestConfig,
    extra: dict[str, Any],
    before_download: dict[str, int] | None,
) -> IngestResult:
    summary = summarize(run_stats, time.time() - start, before_download)
    result.shards_written = len(run_stats)
    result.successes = summary["successes"]
    result.failures = summary["failed_to_download"] + summary["failed_to_resize"]
    result.filtered = summary["filtered"]
    warning = failure_warning(summary, cfg.failure_warn_rate, result.source_id)
    if warning:
        log.warning(warning)
        result.warnings.append(warning)
    result.stats = {
        "source_id": result.source_id,
        **extra,
        "shards_total": result.shards_total,
        "shards_written": result.shards_written,
        "shards_skipped": result.shards_skipped,
        "failed_shards": {f"{k:05d}": v for k, v in result.failed_shards.items()},
        **summary,
        "warning": warning,
    }
    write_json(layout.ingest_stats(result.source_id), result.stats)
    log.info("ingest summary\n%s", format_summary(result.stats))
    return result


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
    run_stats = _run_shards(layout, source, pending, cfg, result, progress)
    return _finish(layout, result, run_stats, start, cfg, {"url_list": url_list}, plan.filtered)


def failed_rows(layout: StorageLayout, source: str, statuses: tuple[str, ...]) -> pa.Table:
    """Rows of committed shards with one of ``statuses`` that no later retry has taken up."""
    tables, superseded = [], set()
    for shard in completed_shards(layout, source):
        t = _read_parquet(shard_parquet_path(layout, source, shard))
        if "retry_of" in t.column_names:
            superseded.update(k for k in t.column("retry_of").to_pylist() if k)
        tables.append(t)
    out = []
    for t in tables:
        mask = pc.is_in(t.column("status"), value_set=pa.array(statuses))
        rows = t.filter(mask)
        if superseded and rows.num_rows:
            rows = rows.filter(
                pc.invert(pc.is_in(rows.column("key"), pa.array(sorted(superseded))))
            )
        out.append(rows)
    return pa.concat_tables(out, promote_options="default") if out else pa.table({})


def retry_failed(
    layout: StorageLayout,
    source: str,
    cfg: IngestConfig,
    progress: Callable[[int, int], None] | None = None,
    statuses: tuple[str, ...] = ("failed_to_download",),
) -> IngestResult:
    """Re-download the failed rows of a source's committed shards into new shards.

    Committed shards are never rewritten: each retried row goes to a shard numbered after every
    existing one, with ``retry_of`` naming the key it retries; a row retried once is not retried
    from its old shard again. Filtered rows (status ``filtered``) are never retried.
    """
    if FILTERED in statuses:
        raise ValueError("filtered rows are removed on purpose and cannot be retried")
    plan_path = layout.ingest_plan(source)
    if not exists(plan_path):
        raise ValueError(f"source {source} has no ingest plan ({plan_path}): ingest it first")
    plan = read_json(plan_path)
    if plan["samples_per_shard"] != cfg.samples_per_shard:
        raise ValueError(
            f"source {source} was split with samples_per_shard={plan['samples_per_shard']}, "
            f"config says {cfg.samples_per_shard}"
        )
    rows_path = layout.ingest_rows(source)
    columns = (
        _read_parquet(rows_path) if exists(rows_path) else _read_parquet(layout.source_list(source))
    ).column_names
    failed = failed_rows(layout, source, statuses)
    done = completed_shards(layout, source)
    planned = math.ceil(plan["num_rows"] / plan["samples_per_shard"])
    first = max([planned - 1, *done]) + 1
    n = cfg.samples_per_shard
    count = math.ceil(failed.num_rows / n) if failed.num_rows else 0
    result = IngestResult(source, first + count, 0, len(done), 0, 0)
    if not count:
        return result
    inputs = failed.select([c for c in columns if c != "retry_of"])
    inputs = inputs.append_column("retry_of", failed.column("key"))
    shards = list(range(first, first + count))
    for i, shard in enumerate(shards):
        with (
            atomic_write(layout.shard_input(source, shard)) as f,
            pa.ipc.new_file(f, inputs.schema) as w,
        ):
            w.write_table(inputs.slice(i * n, n))
    start = time.time()
    run_stats = _run_shards(layout, source, shards, cfg, result, progress)
    return _finish(layout, result, run_stats, start, cfg, {"retry_failed": list(statuses)}, None)
