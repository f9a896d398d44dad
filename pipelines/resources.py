"""Dagster resources: the pipeline config, injected into every asset."""

from __future__ import annotations

import yaml
from dagster import ConfigurableResource

from unclip.pipelines.config import PipelineConfig, load_config


class UnclipConfigResource(ConfigurableResource):
    """The pipeline config: a YAML file plus overrides (YAML text of a nested mapping)."""

    config_path: str
    overrides_yaml: str = ""

    def load(self) -> PipelineConfig:
        return load_config(self.config_path, yaml.safe_load(self.overrides_yaml) or {})
