"""Asset values on the storage root: an IO manager that keeps them as JSON beside the data.

``values/{asset}/{partition}.json`` (``_.json`` when unpartitioned) is written through a
temporary name and a rename, like every other file of the root. Keeping the values on the root
rather than in Dagster's local storage lets a run on one machine read what a run on another
machine produced, and lets the CLI and the UI share them.
"""

from __future__ import annotations

from typing import Any

import dagster as dg

from unclip.datasets.storage import StorageLayout, exists, read_json, write_json
from unclip.pipelines.resources import StorageResource
from unclip.pipelines.values import from_json, to_json

UNPARTITIONED = "_"


def value_path(layout: StorageLayout, asset: str, partition: str | None) -> str:
    """Where the value of ``asset`` (one partition of it) is kept."""
    return layout.join("values", asset, f"{partition or UNPARTITIONED}.json")


class StoreValueIOManager(dg.ConfigurableIOManager):
    """Writes each asset's typed value as JSON under the storage root; reads it back for inputs."""

    storage: StorageResource

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        partition = context.partition_key if context.has_asset_partitions else None
        path = value_path(self.storage.layout, context.asset_key.to_user_string(), partition)
        data = to_json(obj)
        if (
            not exists(path) or read_json(path) != data
        ):  # a re-run that changed nothing writes nothing
            write_json(path, data)

    def load_input(self, context: dg.InputContext) -> Any:
        asset = context.asset_key.to_user_string()
        partition = context.asset_partition_key if context.has_asset_partitions else None
        path = value_path(self.storage.layout, asset, partition)
        if not exists(path):
            raise FileNotFoundError(
                f"{asset} has no value under {self.storage.root} ({path} is missing): "
                f"materialize {asset} first (`unclip run` materializes everything)"
            )
        return from_json(read_json(path))
