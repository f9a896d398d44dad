"""Materialize the pipeline in-process against a persistent Dagster instance.

One ``unclip run`` is a few Dagster runs, in order: for each source partition, its URL list
and image shards; the CLIP (unpartitioned: trained once, then pinned); for each partition, its
embeddings; then manifest → prior, decoder → evaluation → promotion. Every stage skips what is
already on storage, so a re-run does no work and a new source costs only its own shards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import yaml

from unclip.datasets.lease import Lease
from unclip.datasets.storage import StorageLayout
from unclip.pipelines import stages as stages_mod
from unclip.pipelines.assets import ALL_ASSETS, SOURCES
from unclip.pipelines.config import PipelineConfig
from unclip.pipelines.definitions import build_definitions
from unclip.pipelines.instance import dagster_home

StageEvent = Callable[[str, str], None]  # (event, stage): event in {"start", "success", "failure"}

_EVENTS = {"STEP_START": "start", "STEP_SUCCESS": "success", "STEP_FAILURE": "failure"}
STAGES = [a.key.to_user_string() for a in ALL_ASSETS]
# (assets, one run per source partition?) in the order they run.
PHASES: list[tuple[list[str], bool]] = [
    (["url_lists", "image_shards"], True),
    (["clip_model"], False),
    (["embeddings"], True),
    (
        [
            "curated_embeddings",
            "dataset_manifest",
            "prior",
            "decoder",
            "upsampler",
            "evaluation",
            "promotion",
        ],
        False,
    ),
]


@dataclass
class PipelineRun:
    success: bool
    run_id: str
    dagster_home: str
    stage_seconds: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    run_ids: list[str] = field(default_factory=list)
    partitions: list[str] = field(default_factory=list)


def instance_for(cfg: PipelineConfig) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(dagster_home(cfg))


def _event_logger(on_event: StageEvent | None) -> dg.LoggerDefinition:
    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            meta = record.__dict__.get("dagster_meta")
            event = meta.get("dagster_event") if isinstance(meta, dict) else None
            if event is not None and on_event and event.event_type_value in _EVENTS:
                on_event(_EVENTS[event.event_type_value], event.step_key or "")

    @dg.logger
    def stage_events(_init_context: Any) -> logging.Logger:
        log = logging.Logger("unclip.stages", level=logging.DEBUG)
        log.addHandler(Handler())
        return log

    return stage_events


def _merge_partition_output(acc: dict[str, Any] | None, value: dict[str, Any]) -> dict[str, Any]:
    """Sum counts and concatenate lists over partitions; keep the last of anything else."""
    if acc is None:
        return dict(value)
    out = dict(acc)
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, list)) or k not in out:
            out[k] = v
        elif isinstance(v, list):
            out[k] = [*out[k], *v]
        else:
            out[k] = out[k] + v
    return out


@contextlib.contextmanager
def writer_lease(
    cfg: PipelineConfig, what: str | None = None, wait_s: float = 0.0
) -> Iterator[Lease]:
    """Hold the storage root's writer lease: one run writes a root at a time.

    A second run waits up to ``wait_s`` seconds, then raises ``LeaseHeld`` naming the holder.
    """
    what = what or "unclip " + " ".join(
        os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)
    )
    with Lease(StorageLayout(cfg.storage).lease("writer"), what=what).hold(wait_s=wait_s) as lease:
        yield lease


def run_pipeline(
    config_path: str,
    cfg: PipelineConfig,
    overrides: dict[str, Any] | None = None,
    on_event: StageEvent | None = None,
    stages: list[str] | None = None,
    partitions: list[str] | None = None,
    wait_s: float = 0.0,
) -> PipelineRun:
    """Materialize all assets (or ``stages``), each source partition (or ``partitions``).

    The whole run holds the storage root's writer lease (:func:`writer_lease`).
    """
    with writer_lease(cfg, wait_s=wait_s):
        return _run_pipeline(config_path, cfg, overrides, on_event, stages, partitions)


def _run_pipeline(
    config_path: str,
    cfg: PipelineConfig,
    overrides: dict[str, Any] | None,
    on_event: StageEvent | None,
    stages: list[str] | None,
    partitions: list[str] | None,
) -> PipelineRun:
    base = build_definitions(os.path.abspath(config_path), yaml.safe_dump(overrides or {}))
    known = {a.key.to_user_string() for a in base.assets}  # type: ignore[union-attr]
    selected = [s for s in (stages or STAGES) if s in known]
    jobs = []
    for i, (names, _) in enumerate(PHASES):
        names = [n for n in names if n in selected]
        if names:
            jobs.append(
                dg.define_asset_job(f"phase_{i}", selection=dg.AssetSelection.assets(*names))
            )
    defs = dg.Definitions(
        assets=base.assets,
        jobs=jobs,
        resources=base.resources,
        executor=dg.in_process_executor,
        loggers={"stage_events": _event_logger(on_event)},
    )
    instance = instance_for(cfg)
    keys = partitions
    if keys is None:
        stages_mod.register_sources(cfg)
        keys = stages_mod.source_ids(cfg)
    missing = [k for k in keys if not instance.has_dynamic_partition(SOURCES.name, k)]
    if missing:
        instance.add_dynamic_partitions(SOURCES.name, missing)

    run = PipelineRun(True, "", instance.root_directory, partitions=list(keys))
    for i, (_, partitioned) in enumerate(PHASES):
        if f"phase_{i}" not in {j.name for j in jobs}:
            continue
        job = defs.resolve_job_def(f"phase_{i}")
        for key in keys if partitioned else [None]:
            result = job.execute_in_process(
                instance=instance,
                partition_key=key,
                run_config={"loggers": {"stage_events": {}}},
                raise_on_error=False,
            )
            run.run_id = result.run_id
            run.run_ids.append(result.run_id)
            for s in instance.get_run_step_stats(result.run_id):
                if s.start_time:
                    secs = (s.end_time or 0) - s.start_time
                    run.stage_seconds[s.step_key] = run.stage_seconds.get(s.step_key, 0.0) + secs
            for node in job.graph.node_dict:
                try:
                    value = result.output_for_node(node)
                except Exception:  # the stage failed or did not run
                    continue
                run.outputs[node] = (
                    _merge_partition_output(run.outputs.get(node), value) if key else value
                )
            if not result.success:
                run.success = False
                failure = next((e for e in result.all_events if e.is_step_failure), None)
                err = failure.step_failure_data.error if failure else None
                where = f"{failure.step_key if failure else '?'}" + (f"[{key}]" if key else "")
                raise PipelineFailed(run, where, err.to_string() if err else "")
    return run


class PipelineFailed(RuntimeError):
    def __init__(self, run: PipelineRun, stage: str, error: str) -> None:
        super().__init__(f"stage {stage!r} failed:\n{error}")
        self.run = run
        self.stage = stage
