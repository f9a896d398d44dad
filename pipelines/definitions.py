"""The Dagster definitions: what ``unclip ui``, ``dagster dev -m`` and every CLI command run.

The config file comes from ``UNCLIP_CONFIG`` when the UI loads this module, and the storage root
from ``UNCLIP_STORAGE`` when set (else the config's ``storage``); the CLI builds the same
definitions for the file it is given and runs their jobs (``runner.py``). Jobs:

- ``ingest_source`` (partitioned by source): URL list → image shards → embeddings of one source;
  the inbox sensor starts one per new list.
- ``bootstrap_clip``: the CLIP (trained once on the sources present, then pinned).
- ``retrain``: manifest → prior, decoder (→ upsampler) → evaluation → promotion; the schedule
  starts it.
"""

from __future__ import annotations

import os

import dagster as dg
import yaml

from unclip.pipelines.assets import ALL_ASSETS, SOURCE_ASSETS, TRAIN_ASSETS, clip_model
from unclip.pipelines.config import storage_from_env
from unclip.pipelines.resources import resources_for
from unclip.pipelines.schedules import RETRAIN_JOB, build_retrain_schedule
from unclip.pipelines.sensors import INGEST_JOB, build_inbox_sensor

DEFAULT_CONFIG = "configs/demo.yaml"
CLIP_JOB = "bootstrap_clip"


def storage_override(overrides_yaml: str = "") -> str:
    """``overrides_yaml`` with ``UNCLIP_STORAGE`` (when set) as the storage root."""
    root = storage_from_env()
    if root is None:
        return overrides_yaml
    return yaml.safe_dump({**(yaml.safe_load(overrides_yaml) or {}), "storage": root})


def build_definitions(
    config_path: str,
    overrides_yaml: str = "",
    loggers: dict[str, dg.LoggerDefinition] | None = None,
) -> dg.Definitions:
    """Assets, jobs, the inbox sensor and the retraining schedule for one config file.

    ``loggers`` are added to every job (the CLI's progress board listens through one).
    """
    resources = resources_for(config_path, overrides_yaml)
    cfg = resources["unclip"].load()  # type: ignore[attr-defined]
    jobs = [
        dg.define_asset_job(
            INGEST_JOB,
            selection=dg.AssetSelection.assets(*SOURCE_ASSETS),
            description="Ingest and embed one source (partition).",
        ),
        dg.define_asset_job(CLIP_JOB, selection=dg.AssetSelection.assets(clip_model)),
        dg.define_asset_job(
            RETRAIN_JOB,
            selection=dg.AssetSelection.assets(*TRAIN_ASSETS),
            description="Manifest → prior, decoder → evaluation → promotion.",
        ),
    ]
    return dg.Definitions(
        assets=ALL_ASSETS,
        jobs=jobs,
        sensors=[build_inbox_sensor(cfg)],
        schedules=[build_retrain_schedule(cfg)],
        # One process per run: the stages share one Ray (embedded or RAY_ADDRESS) per run.
        executor=dg.in_process_executor,
        resources=resources,
        loggers=loggers,
    )


@dg.definitions
def defs() -> dg.Definitions:
    """The definitions of ``UNCLIP_CONFIG`` (default configs/demo.yaml) on ``UNCLIP_STORAGE``."""
    config = os.path.abspath(os.environ.get("UNCLIP_CONFIG", DEFAULT_CONFIG))
    return build_definitions(config, storage_override())
