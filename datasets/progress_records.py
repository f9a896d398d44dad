"""Progress as log records: one line each for logs, and numbers for a terminal's progress bars.

A long step logs ``log.info(line, extra=progress_extra(task, done, total))``. Off a terminal
the line is what shows; on one the CLI draws a bar per ``task`` from the numbers and leaves the
line out. Work that reports from Ray workers (training) is relayed to the driver as such
records only while bars are drawn (:func:`bars_drawn`); otherwise its own lines show.
"""

from __future__ import annotations

import logging
from typing import Any

PROGRESS_ATTR = "unclip_progress"
_bars = {"drawn": False}


def progress_extra(task: str, done: float, total: float) -> dict[str, Any]:
    """The ``extra`` of a progress record: which work (``task``) and how far it is."""
    return {PROGRESS_ATTR: (task, float(done), float(total))}


def progress_of(record: logging.LogRecord) -> tuple[str, float, float] | None:
    """``(task, done, total)`` of a progress record, else None."""
    return getattr(record, PROGRESS_ATTR, None)


def set_bars_drawn(drawn: bool) -> None:
    """Whether a terminal draws progress bars now (set by the CLI around its live display)."""
    _bars["drawn"] = drawn


def bars_drawn() -> bool:
    """True while a terminal draws progress bars from progress records."""
    return _bars["drawn"]
