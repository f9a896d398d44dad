"""What the CLI shows: a live board of stages while a command runs, and its outputs after."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from unclip.datasets.progress_records import progress_of, set_bars_drawn
from unclip.pipelines.config import PipelineConfig
from unclip.training.evaluation.metric_names import CASCADE_SUMMARY_NAMES, PRIOR_METRIC_NAMES

console = Console()
LOG_HANDLER_NAME = "unclip-cli"
VERBOSITY_LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}


def fail(message: str, code: int) -> NoReturn:
    """Print ``message`` as the command's error and exit with ``code``, without a traceback."""
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code) from None


@contextmanager
def exit_on(codes: dict[type[Exception], int]) -> Iterator[None]:
    """Expected errors of the block as a message and an exit code (the first type that matches)."""
    try:
        yield
    except tuple(codes) as e:
        fail(str(e), next(code for kind, code in codes.items() if isinstance(e, kind)))


class StdoutHandler(logging.StreamHandler):
    """A plain handler on whatever ``sys.stdout`` is when a record comes (a test swaps it)."""

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def install_log_handler(verbosity: int = 0) -> logging.Handler:
    """The CLI's root log handler, on the console's stream: rich on a terminal, plain lines
    otherwise. unclip's loggers log at INFO (DEBUG with ``verbosity`` 1, WARNING with -1), every
    other library at WARNING. Installing again replaces the handler."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == LOG_HANDLER_NAME]:
        root.removeHandler(old)
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False)
    else:
        handler = StdoutHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
    handler.set_name(LOG_HANDLER_NAME)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("unclip").setLevel(VERBOSITY_LEVELS[max(-1, min(1, verbosity))])
    return handler


class ProgressBars(logging.Handler):
    """A terminal bar per task of the progress records (ingest and embed of each source, each
    training run, the evaluation), drawn under the stage board."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            auto_refresh=False,  # the live display redraws it
        )
        self.tasks: dict[str, TaskID] = {}

    def emit(self, record: logging.LogRecord) -> None:
        update = progress_of(record)
        if update is None:
            return
        task, done, total = update
        if task not in self.tasks:
            self.tasks[task] = self.progress.add_task(task, total=total)
        self.progress.update(self.tasks[task], completed=done, total=total)


def _no_progress(record: logging.LogRecord) -> bool:
    return progress_of(record) is None


@contextmanager
def live_board(board: StageBoard) -> Iterator[ProgressBars]:
    """On a terminal: the stage board and the progress bars, redrawn live; while it shows,
    progress records draw bars instead of log lines (and training relays its progress here)."""
    bars = ProgressBars()
    root = logging.getLogger()
    lines = [h for h in root.handlers if h.get_name() == LOG_HANDLER_NAME]
    root.addHandler(bars)
    for h in lines:
        h.addFilter(_no_progress)
    set_bars_drawn(True)
    try:
        with Live(Group(board, bars.progress), console=console, refresh_per_second=2):
            yield bars
    finally:
        set_bars_drawn(False)
        root.removeHandler(bars)
        for h in lines:
            h.removeFilter(_no_progress)


class StageBoard:
    """A table of stages: pending, running (with elapsed time), done or failed.

    On a terminal it is drawn live; elsewhere (a log file, ``kubectl logs``) ``echo`` gets one
    plain line per stage event instead, as it happens.
    """

    def __init__(self, stages: list[str], echo: Callable[[str], None] | None = None) -> None:
        self.state = {s: "pending" for s in stages}
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.runs: dict[str, int] = {}
        self.echo = echo

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
        if self.echo is not None:
            self.echo(self.event_line(event, stage))

    def event_line(self, event: str, stage: str) -> str:
        """One plain line for a stage event: ``stage prior: running`` / ``done in 3.2 s``."""
        stamp = time.strftime("%H:%M:%S")
        if event == "start":
            return f"{stamp} stage {stage}: running (run {self.runs[stage]})"
        took = self.seconds.get(stage, 0.0)
        return (
            f"{stamp} stage {stage}: {'done' if event == 'success' else 'failed'} ({took:,.1f} s)"
        )

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
    for model in ("prior", "decoder", "upsampler"):
        if outputs.get(model) is not None:
            t.add_row(f"{model} export", outputs[model].export_dir)
    e = outputs.get("evaluation")
    if e is not None:
        t.add_row("prior metrics", e.prior_metrics_path)
        for k in PRIOR_METRIC_NAMES:
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
