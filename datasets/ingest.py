"""Ingest: a URL list becomes webdataset shards, one Ray task per shard running img2dataset's Downloader.

Plan (``source_plan.py``): the list is copied to ``sources/{source}.parquet`` and split into
fixed slices of ``samples_per_shard`` rows (the split is recorded in ``_plan.json`` and may not
change later). Each missing shard is one Ray task (``shard_task.py``): under the shard's lease
it copies its input slice from the storage root, runs img2dataset's ``Downloader`` in a child
process that is killed at ``shard_deadline_s`` (``shard_child.py``), then commits ``.parquet``,
``_stats.json`` (with a commit record) and finally ``.tar``, each durably. A shard exists only
when its tar matches its commit record, so a killed task leaves nothing a reader takes, and a
re-run redoes exactly the missing shards. Failed samples are rows in the shard's Parquet
(status + error message); a failed shard task is retried by Ray, and the driver's wait is
bounded too.

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
import ray

from .config import IngestConfig
from .image_filters import FILTERED
from .ingest_stats import failure_warning, format_summary, summarize
from .progress_records import progress_extra
from .ray_runtime import ensure_started
from .shard_child import STARTUP_S
from .shard_task import ShardDeadlineExceeded, ShardError, download_shard, lease_wait_s
from .shards import completed_shards
from .source_plan import plan_source, write_shard_inputs
from .storage import StorageLayout, exists, read_json, read_parquet, write_json
from .url_lists import source_id

__all__ = [
    "IngestFailed",
    "IngestResult",
    "ShardDeadlineExceeded",
    "ShardError",
    "download_shard",
    "completed_shards",
    "format_summary",
    "ingest_source",
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
    started, images = time.monotonic(), 0
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
            images += run_stats[shard]["successes"]
        except Exception as e:  # after Ray's retries: report, keep the other shards
            result.failed_shards[shard] = f"{type(e).__name__}: {e}"[:2000]
            log.error("ingest %s shard %05d failed: %s", source, shard, e)
        done = result.shards_skipped + len(run_stats) + len(result.failed_shards)
        log.info(
            "ingest %s: %d/%d shards done (%d failed), %d images, %.1f images/s",
            source,
            done,
            result.shards_total,
            len(result.failed_shards),
            images,
            images / max(time.monotonic() - started, 1e-9),
            extra=progress_extra(f"ingest {source}", done, result.shards_total),
        )
        if progress:
            progress(done, result.shards_total)
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
        t = read_parquet(shard_parquet_path(layout, source, shard))
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
        read_parquet(rows_path) if exists(rows_path) else read_parquet(layout.source_list(source))
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
    write_shard_inputs(layout, source, inputs, shards, n, first)
    start = time.time()
    run_stats = _run_shards(layout, source, shards, cfg, result, progress)
    return _finish(layout, result, run_stats, start, cfg, {"retry_failed": list(statuses)}, None)
