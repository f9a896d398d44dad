"""A run's human-facing record: ``metrics.jsonl`` (one row per logged step) and the loss curve."""

from __future__ import annotations

import io
import json
from typing import Any

from unclip.datasets.storage import atomic_write, exists

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class RunLog:
    """Rows of logged steps, rewritten whole through an atomic write (object stores cannot append)."""

    def __init__(self, run_dir: str) -> None:
        self.path = f"{run_dir}/{METRICS_FILE}"
        self.plot_path = f"{run_dir}/{PLOT_FILE}"
        self.rows: list[dict[str, Any]] = []

    def resume(self, step: int) -> None:
        """Keep the rows up to ``step``: later ones belong to steps that will run again."""
        self.rows = [r for r in read_rows(self.path) if r.get("step", 0) <= step]

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.flush()

    def flush(self) -> None:
        with atomic_write(self.path, "w") as f:
            for row in self.rows:
                f.write(json.dumps(row, sort_keys=True) + "\n")

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
