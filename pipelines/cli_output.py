"""What the CLI shows: a live board of stages while a command runs, and its outputs after."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.table import Table

from unclip.pipelines.config import PipelineConfig
from unclip.training.evaluation.metric_names import CASCADE_SUMMARY_NAMES

console = Console()
PRIOR_SHOWN = ("cos_pred_true", "cos_text_baseline")


class StageBoard:
    """A live table of stages: pending, running (with elapsed time), done or failed."""

    def __init__(self, stages: list[str]) -> None:
        self.state = {s: "pending" for s in stages}
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.runs: dict[str, int] = {}

    def __call__(self, event: str, stage: str) -> None:
        if stage not in self.state:
            return
        if event == "start":
            self.started[stage] = time.monotonic()
            self.state[stage] = "running"
            self.runs[stage] = self.runs.get(stage, 0) + 1
        else:
            # Partitioned stages run once per source: their time is the sum.
            now = time.monotonic()
            spent = now - self.started.get(stage, now)
            self.seconds[stage] = self.seconds.get(stage, 0.0) + spent
            failed = event != "success" or self.state[stage] == "failed"
            self.state[stage] = "failed" if failed else "done"

    def __rich__(self) -> Table:
        t = Table(title="unclip pipeline", show_lines=False)
        t.add_column("stage")
        t.add_column("status")
        t.add_column("runs", justify="right")
        t.add_column("time", justify="right")
        style = {"pending": "dim", "running": "yellow", "done": "green", "failed": "red"}
        for s, st in self.state.items():
            secs = self.seconds.get(s)
            if st == "running":
                secs = (secs or 0.0) + time.monotonic() - self.started[s]
            t.add_row(
                s,
                f"[{style[st]}]{st}[/]",
                str(self.runs.get(s, "")),
                f"{secs:,.1f} s" if secs is not None else "",
            )
        return t


def print_ingest_summaries(summaries: dict[str, Any]) -> None:
    """img2dataset's per-source summary and warnings, for each source that downloaded."""
    for s in summaries.values():
        for text in s.summaries:
            console.print(text)
        for w in s.warnings:
            console.print(f"[yellow]warning:[/yellow] {w}")


def print_outputs(cfg: PipelineConfig, outputs: dict[str, Any]) -> None:
    """Where each stage's outputs are, and the headline metrics."""
    t = Table(title="outputs")
    t.add_column("what", no_wrap=True)
    t.add_column("where / value", overflow="fold")
    t.add_row("storage root", cfg.storage)
    if "image_shards" in outputs:
        print_ingest_summaries(outputs["image_shards"])
    if "dataset_manifest" in outputs:
        m = outputs["dataset_manifest"]
        t.add_row("dataset version", f"{m.version} ({m.num_samples} pairs, {m.num_shards} shards)")
    clip = outputs.get("clip_model")
    if clip is not None and clip.run:
        t.add_row("clip_model export", clip.checkpoint)
    for model in ("prior", "decoder"):
        if outputs.get(model) is not None:
            t.add_row(f"{model} export", outputs[model].export_dir)
    e = outputs.get("evaluation")
    if e is not None:
        t.add_row("prior metrics", e.prior_metrics_path)
        for k in PRIOR_SHOWN:
            if k in e.prior_metrics:
                t.add_row(f"  {k}", f"{e.prior_metrics[k]:.3f}")
        t.add_row("sample grid", e.sample_grid)
        t.add_row("decoder metrics", e.decoder_metrics_path)
        t.add_row("report", e.report)
        for k in CASCADE_SUMMARY_NAMES:
            if k in e.cascade_metrics:
                t.add_row(f"  {k}", f"{e.cascade_metrics[k]:.3f}")
    for o in outputs.get("promotion") or []:
        t.add_row(f"promotion {o.model}", f"{o.status}: {'; '.join(o.reasons)[:200]}")
    console.print(t)
