"""unclip's Python API: load a config, run the pipeline or one of its stages, use what was trained.

Every function runs the same Dagster jobs as the ``unclip`` command line (and the UI), on an
embedded Ray or the cluster at ``RAY_ADDRESS``; every stage is idempotent, so calling one again
does only what is missing. Heavy parts (Ray, Dagster, torch, diffusers) load on first use.

>>> import unclip
>>> cfg = unclip.load_config("configs/demo.yaml")          # doctest: +SKIP
>>> unclip.run("configs/demo.yaml")                        # doctest: +SKIP
>>> pipe = unclip.UnclipPipeline.from_pretrained("export") # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from unclip.pipelines.config import PipelineConfig
    from unclip.pipelines.runner import PipelineRun
    from unclip.training.inference import UnclipPipeline

__all__ = [
    "UnclipPipeline",
    "embed",
    "evaluate",
    "export",
    "ingest",
    "load_config",
    "run",
    "train",
]

Overrides = dict[str, Any] | None
TRAINABLE = ("prior", "decoder", "upsampler")


def load_config(path: str | os.PathLike, overrides: Overrides = None) -> PipelineConfig:
    """The validated pipeline config of a YAML file, with ``overrides`` (a nested dict) merged in."""
    from unclip.pipelines.config import load_config as load

    return load(path, overrides or {})


def run(config: str | os.PathLike, overrides: Overrides = None, wait_s: float = 0.0) -> PipelineRun:
    """The whole pipeline (``unclip run``): ingest → CLIP → embed → train → evaluate → promote."""
    return _materialize(config, overrides, None, wait_s=wait_s)


def ingest(
    config: str | os.PathLike, overrides: Overrides = None, retry_failed: bool = False
) -> PipelineRun:
    """Download every source's missing shards (``unclip ingest``)."""
    return _materialize(config, overrides, ["image_shards"], retry_failed=retry_failed)


def embed(config: str | os.PathLike, overrides: Overrides = None) -> PipelineRun:
    """Embed every shard without embeddings, and assemble the dataset version (``unclip embed``)."""
    return _materialize(config, overrides, ["dataset_manifest"])


def train(
    config: str | os.PathLike,
    model: Literal["prior", "decoder", "upsampler"],
    overrides: Overrides = None,
) -> PipelineRun:
    """Train one model and whatever it needs that is missing (``unclip train MODEL``)."""
    if model not in TRAINABLE:
        raise ValueError(f"model must be one of {TRAINABLE}, got {model!r}")
    return _materialize(config, overrides, [model])


def evaluate(config: str | os.PathLike, overrides: Overrides = None) -> PipelineRun:
    """Evaluate the trained prior and cascade: metrics, sample grids, report (``unclip evaluate``)."""
    return _materialize(config, overrides, ["evaluation"])


def export(
    config: str | os.PathLike,
    out: str | os.PathLike,
    which: Literal["promoted", "latest"] = "promoted",
    runs: dict[str, str] | None = None,
    overrides: Overrides = None,
) -> str:
    """Bundle the promoted (or latest, or named) runs as one diffusers pipeline folder."""
    from unclip.pipelines.model_bundle import export_cascade

    return export_cascade(load_config(config, overrides), os.fspath(out), which, runs)


def _materialize(
    config: str | os.PathLike, overrides: Overrides, targets: list[str] | None, **kw: Any
) -> PipelineRun:
    from unclip.pipelines.runner import run_pipeline, upstream_of

    cfg = load_config(config, overrides)
    select = upstream_of(targets) if targets else None
    return run_pipeline(os.fspath(config), cfg, overrides or {}, select=select, **kw)


def __getattr__(name: str) -> Any:
    if name == "UnclipPipeline":
        from unclip.training.inference import UnclipPipeline

        return UnclipPipeline
    raise AttributeError(f"module 'unclip' has no attribute {name!r}")
