"""``unclip status``: what a storage root holds and what ran on it lately."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from unclip.datasets.manifest import latest_manifest
from unclip.datasets.recipes import format_kept_table
from unclip.datasets.storage import StorageLayout, exists, read_json
from unclip.pipelines import promotion, sources
from unclip.pipelines.config import PipelineConfig
from unclip.pipelines.instance import dagster_home

RECENT_RUNS = 5


def kept_by_filter(layout: StorageLayout, manifest: dict[str, Any]) -> dict[str, str]:
    """``{"kept_by_filter": table}`` of a curated manifest's kept fractions; ``{}`` otherwise."""
    report = layout.manifest_filter_report(manifest["version"])
    if not exists(report):
        return {}
    return {"kept_by_filter": format_kept_table(read_json(report)["partitions"])}


def status_table(cfg: PipelineConfig) -> Table:
    """Latest dataset version, sources, trained runs, promoted checkpoints and recent runs."""
    import dagster as dg

    layout = StorageLayout(cfg.storage)
    t = Table(title=f"unclip status — {cfg.storage}")
    t.add_column("what")
    t.add_column("value", overflow="fold")
    m = latest_manifest(layout)
    t.add_row(
        "dataset version",
        f"{m['version']} ({m['num_samples']} pairs, {len(m['shards'])} shards)"
        if m
        else "[dim]none[/dim]",
    )
    if m:
        for name, table in kept_by_filter(layout, m).items():
            t.add_row(name.replace("_", " "), table)
    # a config for using what was trained (sampling, export) may name no data at all
    has_data = bool(cfg.sources) or cfg.synthetic is not None
    known = sources.source_lists(cfg) if exists(layout.root) and has_data else {}
    ingested = sum(exists(layout.ingest_plan(s)) for s in known)
    t.add_row("sources", f"{len(known)} registered, {ingested} ingested")
    for model in ("clip", "prior", "decoder", "upsampler"):
        p = layout.latest_run(model)
        if exists(p):
            info = read_json(p)
            t.add_row(f"latest {model}", f"{info['run']} (dataset {info.get('dataset_version')})")
        elif model != "upsampler":
            t.add_row(f"latest {model}", "[dim]none[/dim]")
    for model in cfg.promotion.models:
        if model == "upsampler" and cfg.upsampler is None:
            continue
        rec = promotion.promoted(cfg, model)
        if rec is None:
            t.add_row(f"promoted {model}", "[dim]none[/dim]")
            continue
        shown = ", ".join(
            f"{g.metric}={rec['metrics'].get(g.metric)!s:.6}" for g in cfg.promotion.models[model]
        )
        t.add_row(
            f"promoted {model}", f"{rec['run']} (dataset {rec.get('dataset_version')}) {shown}"
        )
    instance = dg.DagsterInstance.from_config(dagster_home(cfg))
    for r in instance.get_run_records(limit=RECENT_RUNS):
        dr = r.dagster_run
        part = dr.tags.get("dagster/partition")
        t.add_row(
            "run",
            f"{dr.run_id[:8]} {dr.job_name}{f'[{part}]' if part else ''} {dr.status.value} "
            f"{r.create_timestamp:%Y-%m-%d %H:%M}",
        )
    return t
