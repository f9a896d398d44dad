"""Run the jobs of ``definitions.py`` in-process against a persistent Dagster instance.

The CLI runs what the UI runs: the same definitions, jobs and assets. A command names the
assets it wants; their selection with everything upstream (``AssetSelection.upstream``) is cut
into phases from the asset graph, each phase a run of the definitions' job that holds it: one
run per source partition for the partitioned assets (URL list, image shards, embeddings), one
run for the others. Every stage skips what is already on storage, so a re-run does no work and
a new source costs only its own shards.
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
from unclip.pipelines import sources
from unclip.pipelines.assets import ALL_ASSETS, SOURCES
from unclip.pipelines.config import PipelineConfig
from unclip.pipelines.definitions import build_definitions
from unclip.pipelines.instance import dagster_home

StageEvent = Callable[[str, str], None]  # (event, stage): event in {"start", "success", "failure"}

_EVENTS = {"STEP_START": "start", "STEP_SUCCESS": "success", "STEP_FAILURE": "failure"}
STAGES = [a.key.to_user_string() for a in ALL_ASSETS]
EVENT_LOGGER = "stage_events"


@dataclass
class PipelineRun:
    """What a command's runs did: per asset its value (per partition for partitioned assets)."""

    success: bool
    run_id: str
    dagster_home: str
    stage_seconds: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    run_ids: list[str] = field(default_factory=list)
    partitions: list[str] = field(default_factory=list)

    def total(self, asset: str, name: str) -> int:
        """The sum of a count (``name``) over the partitions of ``asset``."""
        return sum(getattr(v, name) for v in self.outputs.get(asset, {}).values())


@dataclass(frozen=True)
class Phase:
    """Assets that run together: one run per source partition, or one run."""

    job: str
    assets: list[dg.AssetKey]
    partitioned: bool


def instance_for(cfg: PipelineConfig) -> dg.DagsterInstance:
    """The Dagster instance of this config (``DAGSTER_HOME``, ``instance.home`` or the root's)."""
    return dg.DagsterInstance.from_config(dagster_home(cfg))


def upstream_of(targets: list[str] | None) -> dg.AssetSelection:
    """``targets`` and everything upstream of them (every asset when ``targets`` is None)."""
    if targets is None:
        return dg.AssetSelection.all()
    return dg.AssetSelection.assets(*targets).upstream()


def upstream_names(targets: list[str]) -> list[str]:
    """The names of ``targets`` and everything upstream of them, in the pipeline's order."""
    keys = upstream_of(targets).resolve(ALL_ASSETS)
    return [name for name in STAGES if dg.AssetKey(name) in keys]


def plan_phases(defs: dg.Definitions, selection: dg.AssetSelection) -> list[Phase]:
    """Cut ``selection`` into phases in dependency order, each held by one job of ``defs``."""
    graph = defs.resolve_asset_graph()
    selected = selection.resolve(graph)
    remaining = [k for k in graph.toposorted_asset_keys if k in selected]
    done: set[dg.AssetKey] = set()
    phases = []
    while remaining:
        partitioned = graph.get(remaining[0]).partitions_def is not None
        phase: list[dg.AssetKey] = []
        for key in remaining:  # topological order: a key's parents come before it
            node = graph.get(key)
            ready = all(p in done or p in phase or p not in selected for p in node.parent_keys)
            if ready and (node.partitions_def is not None) == partitioned:
                phase.append(key)
        remaining = [k for k in remaining if k not in phase]
        done.update(phase)
        phases.append(Phase(_job_holding(defs, phase), phase, partitioned))
    return phases


def _job_holding(defs: dg.Definitions, keys: list[dg.AssetKey]) -> str:
    for job in defs.jobs or []:
        name = job.name  # type: ignore[union-attr]
        if set(keys) <= defs.resolve_job_def(name).asset_layer.executable_asset_keys:
            return name
    raise ValueError(f"no job of the definitions holds {[k.to_user_string() for k in keys]}")


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


def register_sources(cfg: PipelineConfig, instance: dg.DagsterInstance) -> list[str]:
    """Register the configured lists and add every source as a partition of the instance."""
    sources.register_configured(cfg)
    keys = list(sources.source_lists(cfg))
    missing = [k for k in keys if not instance.has_dynamic_partition(SOURCES.name, k)]
    if missing:
        instance.add_dynamic_partitions(SOURCES.name, missing)
    return keys


def run_pipeline(
    config_path: str,
    cfg: PipelineConfig,
    overrides: dict[str, Any] | None = None,
    on_event: StageEvent | None = None,
    select: dg.AssetSelection | None = None,
    wait_s: float = 0.0,
    retry_failed: bool = False,
) -> PipelineRun:
    """Materialize ``select`` (default: every asset) through the definitions' jobs.

    The whole run holds the storage root's writer lease (:func:`writer_lease`). ``retry_failed``
    is the ``image_shards`` asset's config: also re-download failed samples of finished shards.
    """
    with writer_lease(cfg, wait_s=wait_s):
        defs = build_definitions(
            os.path.abspath(config_path),
            yaml.safe_dump(overrides or {}),
            loggers={EVENT_LOGGER: _event_logger(on_event)},
        )
        instance = instance_for(cfg)
        phases = plan_phases(defs, select or dg.AssetSelection.all())
        keys = register_sources(cfg, instance) if any(p.partitioned for p in phases) else []
        run = PipelineRun(True, "", instance.root_directory, partitions=keys)
        for phase in phases:
            for key in keys if phase.partitioned else [None]:
                result = defs.resolve_job_def(phase.job).execute_in_process(
                    instance=instance,
                    partition_key=key,
                    asset_selection=phase.assets,
                    run_config=_run_config(phase, retry_failed),
                    raise_on_error=False,
                )
                _record(run, instance, phase, key, result)
        return run


def _run_config(phase: Phase, retry_failed: bool) -> dict[str, Any]:
    run_config: dict[str, Any] = {"loggers": {EVENT_LOGGER: {}}}
    if retry_failed and dg.AssetKey("image_shards") in phase.assets:
        run_config["ops"] = {"image_shards": {"config": {"retry_failed": True}}}
    return run_config


def _record(
    run: PipelineRun,
    instance: dg.DagsterInstance,
    phase: Phase,
    key: str | None,
    result: dg.ExecuteInProcessResult,
) -> None:
    """Add one run's step times and values to ``run``; raise ``PipelineFailed`` if it failed."""
    run.run_id = result.run_id
    run.run_ids.append(result.run_id)
    for s in instance.get_run_step_stats(result.run_id):
        if s.start_time:
            secs = (s.end_time or 0) - s.start_time
            run.stage_seconds[s.step_key] = run.stage_seconds.get(s.step_key, 0.0) + secs
    for asset in phase.assets:
        name = asset.to_user_string()
        try:
            value = result.output_for_node(name)
        except Exception:  # the stage failed or did not run
            continue
        if key is None:
            run.outputs[name] = value
        else:
            run.outputs.setdefault(name, {})[key] = value
    if not result.success:
        run.success = False
        failure = next((e for e in result.all_events if e.is_step_failure), None)
        err = failure.step_failure_data.error if failure else None
        where = f"{failure.step_key if failure else '?'}" + (f"[{key}]" if key else "")
        raise PipelineFailed(run, where, err.to_string() if err else "")


class PipelineFailed(RuntimeError):
    """A stage failed; ``run`` holds what the runs before it did."""

    def __init__(self, run: PipelineRun, stage: str, error: str) -> None:
        super().__init__(f"stage {stage!r} failed:\n{error}")
        self.run = run
        self.stage = stage
