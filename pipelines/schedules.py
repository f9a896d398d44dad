"""The retraining schedule: manifest → prior and decoder → evaluation → promotion, on a cron."""

from __future__ import annotations

import dagster as dg

from unclip.pipelines.config import PipelineConfig

RETRAIN_JOB = "retrain"


def build_retrain_schedule(cfg: PipelineConfig) -> dg.ScheduleDefinition:
    """Training resumes or skips when the manifest did not change: run names hash its version."""
    return dg.ScheduleDefinition(
        name="retrain_schedule",
        job_name=RETRAIN_JOB,
        cron_schedule=cfg.schedule.cron,
        execution_timezone=cfg.schedule.timezone,
        default_status=(
            dg.DefaultScheduleStatus.RUNNING
            if cfg.schedule.running
            else dg.DefaultScheduleStatus.STOPPED
        ),
        description="Retrain on the current dataset manifest, evaluate, promote if better.",
    )
