"""The Dagster definitions: what ``unclip ui`` and ``dagster dev -m`` load.

The config file comes from ``UNCLIP_CONFIG`` when the UI loads this module; the CLI builds
the same definitions for the file it is given. Jobs:

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
from unclip.pipelines.config import load_config
from unclip.pipelines.resources import UnclipConfigResource
from unclip.pipelines.schedules import RETRAIN_JOB, build_retrain_schedule
from unclip.pipelines.sensors import INGEST_JOB, build_inbox_sensor

DEFAULT_CONFIG = "configs/demo.yaml"


def build_definitions(config_path: str, overrides_yaml: str = "") -> dg.Definitions:
    """Assets, jobs, the inbox sensor and the retraining schedule for one config file."""
    cfg = load_config(config_path, yaml.safe_load(overrides_yaml) or {})
    jobs = [
        dg.define_asset_job(
            INGEST_JOB,
            selection=dg.AssetSelection.assets(*SOURCE_ASSETS),
            description="Ingest and embed one source (partition).",
        ),
        dg.define_asset_job("bootstrap_clip", selection=dg.AssetSelection.assets(clip_model)),
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
        resources={
            "unclip": UnclipConfigResource(config_path=config_path, overrides_yaml=overrides_yaml)
        },
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(os.path.abspath(os.environ.get("UNCLIP_CONFIG", DEFAULT_CONFIG)))
