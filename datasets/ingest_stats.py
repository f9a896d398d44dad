"""Ingest statistics: per-run summaries, filter totals, the failure-rate warning, a printable table.

Shard stats are img2dataset's ``{shard}_stats.json`` with filtered rows moved out of successes
and failures (``filtered``: removals per filter). A run summary adds them up, adds the removals
the pre-download filters made when the source was planned, and warns when the failure rate
(failures over attempted downloads, filtered rows not counted) is above the threshold.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

log = logging.getLogger(__name__)


def summarize(
    run_stats: dict[int, dict[str, Any]],
    duration: float,
    before_download: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Totals over the shard stats of a run (and the plan's pre-download removals)."""
    reasons: Counter[str] = Counter()
    in_shards: Counter[str] = Counter()
    count = successes = failed_download = failed_resize = 0
    for s in run_stats.values():
        count += s["count"]
        successes += s["successes"]
        failed_download += s["failed_to_download"]
        failed_resize += s["failed_to_resize"]
        reasons.update({k: v for k, v in s.get("status_dict", {}).items() if k != "success"})
        in_shards.update(s.get("filtered", {}))
    before = Counter(before_download or {})
    failures = failed_download + failed_resize
    attempted = successes + failures
    return {
        "count": count,
        "successes": successes,
        "failed_to_download": failed_download,
        "failed_to_resize": failed_resize,
        "failure_rate": round(failures / attempted, 4) if attempted else 0.0,
        "failure_reasons": dict(reasons.most_common(20)),
        "filtered_before_download": dict(before),
        "filtered_in_shards": dict(in_shards),
        "filtered": dict(before + in_shards),
        "filtered_total": sum((before + in_shards).values()),
        "duration_s": round(duration, 3),
        "images_per_s": round(successes / duration, 2) if duration > 0 else None,
    }


def failure_warning(summary: dict[str, Any], threshold: float, source: str) -> str | None:
    """A warning naming the top error messages when the failure rate is above ``threshold``."""
    rate = summary.get("failure_rate", 0.0)
    if (
        not summary.get("successes", 0)
        + summary.get("failed_to_download", 0)
        + summary.get("failed_to_resize", 0)
        or rate <= threshold
    ):
        return None
    top = list(summary.get("failure_reasons", {}).items())[:5]
    lines = [f"  {n:>7}  {msg[:160]}" for msg, n in top]
    return (
        f"source {source}: {rate:.1%} of downloads failed (ingest.failure_warn_rate="
        f"{threshold:g}); top errors:\n" + "\n".join(lines)
    )


def format_summary(stats: dict[str, Any]) -> str:
    """A short plain-text table of one run's summary (what the CLI prints at the end)."""
    rows = [
        ("source", stats.get("source_id", "?")),
        (
            "shards written / skipped / failed",
            f"{stats.get('shards_written', 0)} / {stats.get('shards_skipped', 0)} / "
            f"{len(stats.get('failed_shards', {}))}",
        ),
        ("rows in shards", stats.get("count", 0)),
        ("successes", stats.get("successes", 0)),
        ("failed to download", stats.get("failed_to_download", 0)),
        ("failed to resize", stats.get("failed_to_resize", 0)),
        ("failure rate", f"{stats.get('failure_rate', 0.0):.1%}"),
        ("images/s", stats.get("images_per_s")),
    ]
    rows += [(f"filtered: {k}", v) for k, v in sorted(stats.get("filtered", {}).items())]
    rows += [(f"error: {k[:70]}", v) for k, v in list(stats.get("failure_reasons", {}).items())[:5]]
    width = max(len(k) for k, _ in rows)
    out = [f"{k:<{width}}  {v}" for k, v in rows]
    if stats.get("warning"):
        out.append("WARNING: " + stats["warning"])
    return "\n".join(out)
