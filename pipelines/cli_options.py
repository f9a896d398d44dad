"""The arguments every command shares, and the config a command runs with."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from unclip.pipelines.cli_output import exit_on
from unclip.pipelines.config import (
    ConfigError,
    PipelineConfig,
    deep_merge,
    load_config,
    parse_override,
    storage_from_env,
)

ConfigArg = Annotated[Path, typer.Argument(help="Pipeline config YAML, e.g. configs/demo.yaml.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a config key: --set prior.trainer.max_steps=100 (repeatable)."
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(help="Where sampling runs: auto (a GPU when there is one), cpu, cuda or cuda:N."),
]
WaitOpt = Annotated[
    float,
    typer.Option(
        "--wait",
        help="Seconds to wait while another run holds the storage root's writer lease "
        "(0: stop at once, naming the holder).",
    ),
]


def load_cli_config(config: Path, sets: list[str] | None) -> tuple[PipelineConfig, dict[str, Any]]:
    """The config with ``--set`` overrides and ``UNCLIP_STORAGE``; exit 2 naming a bad key."""
    overrides: dict[str, Any] = {}
    for item in sets or []:
        overrides = deep_merge(overrides, parse_override(item))
    env_root = storage_from_env()
    if env_root is not None:
        overrides["storage"] = env_root
    if isinstance(overrides.get("storage"), str) and "://" not in overrides["storage"]:
        # typed in a shell: relative to where the command runs, not to the config's folder
        overrides["storage"] = os.path.abspath(os.path.expanduser(overrides["storage"]))
    with exit_on({ConfigError: 2}):
        return load_config(config, overrides), overrides
