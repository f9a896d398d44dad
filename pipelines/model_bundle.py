"""Which trained runs make up the cascade, and the pipeline folder ``unclip export`` writes.

A cascade is the prior, the decoder and (when configured) the upsampler, each the promoted run
(``registry/{model}.json``, the default), the latest one (``runs/{model}/latest.json``) or a
named run; the CLIP is the one the decoder's embeddings were made with, found by its
``clip_id`` in the embed stage's record. ``unclip sample`` and ``unclip export`` load the same
cascade through :func:`load_cascade`, so an export samples exactly as ``unclip sample`` does.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from unclip.datasets.storage import StorageLayout, exists, read_json
from unclip.pipelines.config import PipelineConfig
from unclip.pipelines.registry import read_record
from unclip.training.engine.fit_result import EXPORT_MARKER
from unclip.training.engine.latest_runs import latest_export

Which = Literal["promoted", "latest"]
CARD_FILE = "README.md"


@dataclass(frozen=True)
class ChosenRun:
    """One model's run in the cascade: where its export is and what is known of it."""

    model: str
    run: str
    export: str
    chosen_as: str  # "promoted", "latest" or "named"
    dataset_version: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def cascade_models(cfg: PipelineConfig) -> list[str]:
    """The models of the configured cascade, in sampling order."""
    return ["prior", "decoder"] + (["upsampler"] if cfg.upsampler is not None else [])


def choose_run(
    cfg: PipelineConfig, model: str, which: Which = "promoted", run: str | None = None
) -> ChosenRun:
    """``model``'s run: ``run`` by name, else the promoted or the latest; a clear error if none."""
    layout = StorageLayout(cfg.storage)
    if run is not None:
        export = layout.join("runs", model, run, "export")
        if not exists(f"{export}/{EXPORT_MARKER}"):
            raise FileNotFoundError(f"{model} run {run!r}: {export}/{EXPORT_MARKER} is missing")
        return ChosenRun(model, run, export, "named")
    if which == "latest":
        export = latest_export(layout, model)
        record = read_json(layout.latest_run(model))
        return ChosenRun(model, record["run"], export, "latest", record.get("dataset_version"))
    record = read_record(layout, model)[0]
    if record is None:
        raise FileNotFoundError(
            f"no promoted {model} under {cfg.storage} ({layout.registry(model)} is missing): "
            "run `unclip run` until one is promoted, or use the latest runs (--latest)"
        )
    return ChosenRun(
        model,
        record["run"],
        record["export"],
        "promoted",
        record.get("dataset_version"),
        dict(record.get("metrics") or {}),
    )


def choose_cascade(
    cfg: PipelineConfig, which: Which = "promoted", runs: dict[str, str] | None = None
) -> list[ChosenRun]:
    """Every model of the cascade; ``runs`` names a run for some of them (model → run name)."""
    runs = dict(runs or {})
    unknown = set(runs) - set(cascade_models(cfg))
    if unknown:
        raise ValueError(f"no such model in this cascade: {sorted(unknown)}")
    return [choose_run(cfg, m, which, runs.get(m)) for m in cascade_models(cfg)]


def load_cascade(cfg: PipelineConfig, chosen: list[ChosenRun], device: str = "cpu") -> Any:
    """The chosen runs and their CLIP as one ``UnclipPipeline`` on ``device``."""
    from unclip.datasets.clip_records import load_clip_of
    from unclip.training.inference import UnclipPipeline
    from unclip.training.models.decoder import INFO_FILE

    by_model = {c.model: c for c in chosen}
    decoder = by_model["decoder"].export
    clip_id = read_json(f"{decoder.rstrip('/')}/{INFO_FILE}")["clip_id"]
    pipe = UnclipPipeline.from_exports(
        decoder,
        load_clip_of(StorageLayout(cfg.storage), clip_id),
        by_model["prior"].export,
        [by_model["upsampler"].export] if "upsampler" in by_model else [],
    )
    return pipe.to(device)


def export_cascade(
    cfg: PipelineConfig, out: str, which: Which = "promoted", runs: dict[str, str] | None = None
) -> str:
    """Write the cascade as one diffusers folder with a model card; replaces ``out`` atomically."""
    chosen = choose_cascade(cfg, which, runs)
    pipe = load_cascade(cfg, chosen)
    out = os.path.abspath(out)
    tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        pipe.save_pretrained(tmp)
        with open(os.path.join(tmp, CARD_FILE), "w") as f:
            f.write(model_card(chosen, pipe.config.decoder_info["clip_id"]))
        old = f"{out}.old-{uuid.uuid4().hex[:8]}" if os.path.exists(out) else None
        if old:
            os.rename(out, old)
        os.rename(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_card(chosen: list[ChosenRun], clip_id: str) -> str:
    """A short README: the runs, their data version, metrics and training config, how to load."""
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [unclip, text-to-image]",
        "---",
        "",
        "# unCLIP cascade",
        "",
        f"CLIP `{clip_id}` (folder `clip/`, open_clip's `local-dir:` layout).",
        "",
        "| model | run | chosen as | data version |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {c.model} | `{c.run}` | {c.chosen_as} | `{c.dataset_version or _fit(c).get('data_version')}` |"
        for c in chosen
    ]
    for c in chosen:
        lines += ["", f"## {c.model}", ""]
        if c.metrics:
            lines += ["Metrics:", "", "```json", json.dumps(c.metrics, indent=2), "```", ""]
        lines += ["Training config:", "", "```json", json.dumps(_fit(c), indent=2), "```"]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from unclip import UnclipPipeline",
        "",
        'pipe = UnclipPipeline.from_pretrained("THIS_FOLDER")',
        'images = pipe(["a red circle"], seed=0).images',
        "```",
        "",
        "Without importing unclip by name: `DiffusionPipeline.from_pretrained(folder, "
        'custom_pipeline=f"{folder}/unclip_pipeline.py", trust_remote_code=True)`.',
        "",
    ]
    return "\n".join(lines)


def _fit(c: ChosenRun) -> dict[str, Any]:
    """What the run's ``fit.json`` says it was trained with (task and trainer)."""
    marker = f"{c.export.rstrip('/')}/{EXPORT_MARKER}"
    if not exists(marker):
        return {}
    fit = read_json(marker)
    task = fit.get("task") or {}
    return {**(task.get(c.model) or {}), "data_version": task.get("data_version")}
