"""A run's human-facing record: ``metrics.jsonl`` (one row per logged step) and the loss curve."""

from __future__ import annotations

import io
import json
import time
from typing import Any

from unclip.datasets.storage import atomic_write, exists

RUN_METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss.png"


class RunLog:
    """Rows of logged steps, kept in memory and written to the storage root in batches.

    Object stores cannot append, so each write replaces the whole file (temporary name +
    rename). Rows are therefore written every ``flush_rows`` rows or ``flush_s`` seconds, not
    every row, and at every checkpoint before it is reported (:meth:`flush`): the file is always
    whole JSONL and holds at least every row up to the last checkpoint. Rows written after that
    checkpoint belong to steps a resume runs again; :meth:`resume` drops them.
    """

    def __init__(self, run_dir: str, flush_rows: int = 100, flush_s: float = 60.0) -> None:
        if flush_rows < 1:
            raise ValueError(f"flush_rows must be >= 1, got {flush_rows}")
        self.path = f"{run_dir}/{RUN_METRICS_FILE}"
        self.plot_path = f"{run_dir}/{LOSS_PLOT_FILE}"
        self.flush_rows, self.flush_s = flush_rows, flush_s
        self.rows: list[dict[str, Any]] = []
        self.written: int | None = 0  # rows the file holds, None when it holds others too
        self.last_write = time.monotonic()

    def resume(self, step: int) -> None:
        """Keep the rows up to ``step``: later ones belong to steps that will run again."""
        on_file = read_rows(self.path)
        self.rows = [r for r in on_file if r.get("step", 0) <= step]
        self.written = len(self.rows) if len(self.rows) == len(on_file) else None

    def append(self, row: dict[str, Any]) -> None:
        """Add a row; write the file when enough rows or seconds have gathered."""
        self.rows.append(row)
        pending = len(self.rows) - (self.written or 0)
        if pending >= self.flush_rows or time.monotonic() - self.last_write >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Write every row now (a no-op when the file already holds exactly them)."""
        if self.written == len(self.rows):
            return
        with atomic_write(self.path, "w") as f:
            f.write("".join(json.dumps(row, sort_keys=True) + "\n" for row in self.rows))
        self.written, self.last_write = len(self.rows), time.monotonic()

    def plot(self, title: str) -> str:
        """Write the loss curve as PNG next to the metrics; returns its path."""
        return plot_loss(self.rows, self.plot_path, title)


def read_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``; empty when there is none yet."""
    if not exists(path):
        return []
    from fsspec.core import url_to_fs

    fs, p = url_to_fs(path)
    with fs.open(p, "r") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(rows: list[dict[str, Any]], path: str, title: str) -> str:
    """Loss against step (log scale when the loss stays positive)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows if "loss" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, losses, marker="." if len(steps) < 50 else None)
    if losses and min(losses) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())
    return path
