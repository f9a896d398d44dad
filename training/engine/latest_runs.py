"""``runs/{model}/latest.json``: the run of each model trained last, for sampling and status."""

from __future__ import annotations

from unclip.datasets.storage import StorageLayout, exists, read_json, write_json

from .trainer import FitResult


def record_latest(
    layout: StorageLayout, model: str, fit: FitResult, dataset_version: str | None
) -> None:
    """Point ``runs/{model}/latest.json`` at ``fit``; unchanged (not rewritten) on a re-run."""
    path = layout.latest_run(model)
    record = {"run": fit.run_name, "export": fit.export_dir, "dataset_version": dataset_version}
    if not exists(path) or read_json(path) != record:
        write_json(path, record)


def latest_export(layout: StorageLayout, model: str) -> str:
    """The export folder of ``model``'s latest run; a clear error when none was trained."""
    path = layout.latest_run(model)
    if not exists(path):
        raise FileNotFoundError(
            f"no trained {model} under {layout.root} ({path} is missing): run `unclip run` or "
            f"`unclip train {model}` first"
        )
    return read_json(path)["export"]
