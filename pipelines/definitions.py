"""The Dagster definitions: what ``unclip ui`` and ``dagster dev -m`` load.

The config file comes from ``UNCLIP_CONFIG`` when the UI loads this module; the CLI builds
the same definitions for the file it is given.
"""

from __future__ import annotations

import os

import dagster as dg

from unclip.pipelines.assets import ALL_ASSETS
from unclip.pipelines.resources import UnclipConfigResource

DEFAULT_CONFIG = "configs/demo.yaml"


def build_definitions(config_path: str, overrides_yaml: str = "") -> dg.Definitions:
    pipeline = dg.define_asset_job("pipeline", selection=dg.AssetSelection.all())
    return dg.Definitions(
        assets=ALL_ASSETS,
        jobs=[pipeline],
        resources={
            "unclip": UnclipConfigResource(config_path=config_path, overrides_yaml=overrides_yaml)
        },
    )


defs = build_definitions(os.path.abspath(os.environ.get("UNCLIP_CONFIG", DEFAULT_CONFIG)))
