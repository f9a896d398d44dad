"""Materialize the pipeline in-process against a persistent Dagster instance."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from unclip.pipelines.assets import ALL_ASSETS
from unclip.pipelines.config import PipelineConfig
from unclip.pipelines.definitions import build_definitions

StageEvent = Callable[[str, str], None]  # (event, stage): event in {"start", "success", "failure"}

_EVENTS = {"STEP_START": "start", "STEP_SUCCESS": "success", "STEP_FAILURE": "failure"}
STAGES = [a.key.to_user_string() for a in ALL_ASSETS]


@dataclass
class PipelineRun:
    success: bool
    run_id: str
    dagster_home: str
    stage_seconds: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)


def dagster_home(cfg: PipelineConfig) -> str:
    """``DAGSTER_HOME`` when set; else ``<storage>/dagster`` for a local root (SQLite)."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        if "://" in cfg.storage:
            home = str(Path.home() / ".unclip" / "dagster")
        else:
            home = os.path.join(cfg.storage, "dagster")
    os.makedirs(home, exist_ok=True)
    settings = Path(home, "dagster.yaml")
    if not settings.exists():
        settings.write_text("telemetry:\n  enabled: false\n")
    return home


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


def run_pipeline(
    config_path: str,
    cfg: PipelineConfig,
    overrides: dict[str, Any] | None = None,
    on_event: StageEvent | None = None,
    stages: list[str] | None = None,
) -> PipelineRun:
    """Materialize all assets (or ``stages`` and what they need already on storage)."""
    defs = build_definitions(os.path.abspath(config_path), yaml.safe_dump(overrides or {}))
    selection = dg.AssetSelection.assets(*stages) if stages else dg.AssetSelection.all()
    job = dg.define_asset_job("pipeline", selection=selection)
    defs = dg.Definitions(
        assets=defs.assets,
        jobs=[job],
        resources=defs.resources,
        loggers={"stage_events": _event_logger(on_event)},
    )
    instance = instance_for(cfg)
    result = defs.resolve_job_def("pipeline").execute_in_process(
        instance=instance,
        run_config={"loggers": {"stage_events": {}}},
        raise_on_error=False,
    )
    stats = instance.get_run_step_stats(result.run_id)
    seconds = {s.step_key: (s.end_time or 0) - (s.start_time or 0) for s in stats if s.start_time}
    outputs = {}
    for key in stages or STAGES:
        try:
            outputs[key] = result.output_for_node(key)
        except Exception:  # the stage failed or did not run
            pass
    run = PipelineRun(result.success, result.run_id, instance.root_directory, seconds, outputs)
    if not result.success:
        failure = next((e for e in result.all_events if e.is_step_failure), None)
        err = failure.step_failure_data.error if failure else None
        raise PipelineFailed(
            run, failure.step_key if failure else "?", err.to_string() if err else ""
        )
    return run


class PipelineFailed(RuntimeError):
    def __init__(self, run: PipelineRun, stage: str, error: str) -> None:
        super().__init__(f"stage {stage!r} failed:\n{error}")
        self.run = run
        self.stage = stage
