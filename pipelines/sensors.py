"""The inbox sensor: each new URL list in ``incoming/`` becomes a source partition, ingested
and embedded by a run of its own; a list that fails validation is moved aside with the reason.
"""

import json

import dagster as dg
from dagster import SensorEvaluationContext

from unclip.pipelines import sources
from unclip.pipelines.assets import SOURCES
from unclip.pipelines.config import PipelineConfig
from unclip.pipelines.resources import UnclipConfigResource

INGEST_JOB = "ingest_source"


def evaluate_inbox(cfg: PipelineConfig, cursor: str | None, log: object = None) -> dg.SensorResult:
    """One look at the inbox: accept, register and request a run for each new valid list.

    The cursor maps file names to fingerprints (size, mtime) of lists already handled; it keeps
    only files still in the inbox (a move that failed), so a list is never handled twice and a
    new list under an old name is. Run keys are source ids: the same list twice is one run.
    Any failure with one file (unreadable, corrupt, a move that fails) is that file's: it is
    rejected with its reason or logged, and every other file of the tick still gets its run.
    """
    seen: dict[str, str] = json.loads(cursor) if cursor else {}
    files = sources.inbox_files(cfg)
    keep = {f.name: f.fingerprint for f in files if seen.get(f.name) == f.fingerprint}
    requests, new_keys, rejected = [], [], []
    for f in files:
        if f.name in keep:
            continue
        keep[f.name] = f.fingerprint
        try:
            checked = sources.validate(f.path, cfg)
        except ValueError as e:
            _reject(cfg, f, str(e), rejected, log)
            continue
        try:
            sid = sources.accept(cfg, f, checked.source_id)
        except Exception as e:  # storage trouble with this file: the rest of the tick goes on
            _log(log, "error", f"inbox: could not accept {f.name}: {type(e).__name__}: {e}")
            continue
        _log(log, "info", f"inbox: {f.name} ({checked.rows} rows) is source {sid}")
        new_keys.append(sid)
        requests.append(
            dg.RunRequest(
                run_key=f"source-{sid}",
                partition_key=sid,
                job_name=INGEST_JOB,
                tags={"unclip/source": sid, "unclip/list": f.name},
            )
        )
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=(
            [SOURCES.build_add_request(sorted(set(new_keys)))] if new_keys else []
        ),
        cursor=json.dumps(keep, sort_keys=True),
        skip_reason=None if requests else _skip_reason(cfg, rejected),
    )


def _reject(cfg: PipelineConfig, f: object, error: str, rejected: list[str], log: object) -> None:
    """Move one bad list aside; a failure to move it is logged, not raised (the cursor skips it)."""
    try:
        rejected.append(sources.reject(cfg, f, error))  # type: ignore[arg-type]
        _log(log, "warning", f"inbox: rejected {f.name}: {error}")  # type: ignore[attr-defined]
    except Exception as e:
        _log(log, "error", f"inbox: could not move {f.name} aside ({e}); it was bad: {error}")  # type: ignore[attr-defined]


def _skip_reason(cfg: PipelineConfig, rejected: list[str]) -> str:
    if rejected:
        return f"rejected {len(rejected)} list(s): see {sources.incoming_uri(cfg)}/_rejected/"
    return f"no new URL lists in {sources.incoming_uri(cfg)}"


def _log(log: object, level: str, msg: str) -> None:
    if log is not None:
        getattr(log, level)(msg)


def build_inbox_sensor(cfg: PipelineConfig) -> dg.SensorDefinition:
    @dg.sensor(
        name="inbox",
        job_name=INGEST_JOB,
        minimum_interval_seconds=cfg.sensor.interval_seconds,
        default_status=(
            dg.DefaultSensorStatus.RUNNING if cfg.sensor.running else dg.DefaultSensorStatus.STOPPED
        ),
        description=f"New URL lists in {sources.incoming_uri(cfg)} → a partition each.",
    )
    def inbox(context: SensorEvaluationContext, unclip: UnclipConfigResource) -> dg.SensorResult:
        return evaluate_inbox(unclip.load(), context.cursor, context.log)

    return inbox
