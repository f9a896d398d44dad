"""Dagster resources: the pipeline config, the storage root and Ray, injected into every asset.

``definitions.build_definitions`` builds them from one config file; tests swap any of them
(``resources_for`` builds the whole set for a config file and an optional storage root).
"""

from __future__ import annotations

import dagster as dg
import yaml

from unclip.datasets.ray_runtime import RaySettings, configure
from unclip.datasets.storage import StorageLayout
from unclip.pipelines.config import PipelineConfig, load_config


class UnclipConfigResource(dg.ConfigurableResource):
    """The pipeline config: a YAML file plus overrides (YAML text of a nested mapping)."""

    config_path: str
    overrides_yaml: str = ""

    def load(self) -> PipelineConfig:
        """The validated config (errors name the file and key)."""
        return load_config(self.config_path, yaml.safe_load(self.overrides_yaml) or {})


class StorageResource(dg.ConfigurableResource):
    """The storage root every asset reads and writes (a local folder or an fsspec URI)."""

    root: str

    @property
    def layout(self) -> StorageLayout:
        """Where each artifact lives under the root."""
        return StorageLayout(self.root)

    def config(self, unclip: UnclipConfigResource) -> PipelineConfig:
        """``unclip``'s config with this root as its storage."""
        cfg = unclip.load()
        return cfg if cfg.storage == self.root else cfg.model_copy(update={"storage": self.root})


class RayResource(dg.ConfigurableResource):
    """How Ray starts when a step has work for it: ``RAY_ADDRESS`` when set, else embedded.

    Setting the resource up starts nothing: a run whose steps find nothing to do never starts Ray.
    """

    num_cpus: int | None = None

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        configure(RaySettings(num_cpus=self.num_cpus))


def resources_for(
    config_path: str, overrides_yaml: str = "", storage: str | None = None
) -> dict[str, object]:
    """Every resource the assets take, for one config file (``storage``: another root)."""
    from unclip.pipelines.value_store import StoreValueIOManager

    unclip = UnclipConfigResource(config_path=config_path, overrides_yaml=overrides_yaml)
    cfg = unclip.load()
    root = StorageResource(root=storage or cfg.storage)
    return {
        "unclip": unclip,
        "storage": root,
        "ray": RayResource(num_cpus=cfg.ray.num_cpus),
        "io_manager": StoreValueIOManager(storage=root),
    }
