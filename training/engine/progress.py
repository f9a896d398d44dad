"""Training progress as plain log lines: step / max, loss, steps/s and time left, from rank 0.

Lines go through :mod:`logging` (logger ``unclip.training.progress``), so they read the same on
a terminal, in ``ray job logs``, ``kubectl logs`` or a CI log. A Ray worker's root logger has no
handler (Ray forwards only what the worker prints), so :func:`ensure_progress_handler` gives
this logger one on stderr there.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

PROGRESS_LOGGER = "unclip.training.progress"
log = logging.getLogger(PROGRESS_LOGGER)


def format_duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h07m``: short enough for a log line, exact enough for an ETA."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class TrainProgress:
    """The progress line of each logged step: rate over the last window, ETA over this life."""

    def __init__(
        self,
        label: str,
        start_step: int,
        max_steps: int,
        clock: Callable[[], float] = time.monotonic,
        relay: Any = None,
    ) -> None:
        self.label, self.start_step, self.max_steps, self.clock = (
            label,
            start_step,
            max_steps,
            clock,
        )
        self.relay = relay  # a Ray queue the driver reads, or None: lines are logged here
        self.started = self.last_time = clock()
        self.last_step = start_step

    def line(self, step: int, row: dict[str, Any]) -> str:
        """``label step s/max (p%) loss … steps/s … samples/s ETA …``; advances the window."""
        now = self.clock()
        window_rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        life_rate = (step - self.start_step) / max(now - self.started, 1e-9)
        self.last_step, self.last_time = step, now
        parts = [f"{self.label} step {step}/{self.max_steps} ({100 * step / self.max_steps:.0f}%)"]
        if "loss" in row:
            parts.append(f"loss {row['loss']:.4g}")
        parts.append(f"{window_rate:.3g} steps/s")
        if "samples_per_s" in row:
            parts.append(f"{row['samples_per_s']:.4g} samples/s")
        left = self.max_steps - step
        parts.append(f"ETA {format_duration(left / life_rate)}" if left else "done")
        return " ".join(parts)

    def log(self, step: int, row: dict[str, Any]) -> None:
        """Log the line of ``step`` at INFO, or hand it to the driver's relay when it has one
        (a terminal drawing bars; see :class:`ProgressRelay`)."""
        line = self.line(step, row)
        if self.relay is not None:
            with contextlib.suppress(Exception):  # a full or gone queue costs a line, not the run
                self.relay.put_nowait((self.label, step, self.max_steps, line))
            return
        log.info("%s", line)


def ensure_progress_handler() -> None:
    """Give the progress logger a stderr handler where logging has none (a Ray worker)."""
    if log.handlers or logging.getLogger().handlers:
        return  # configured by whoever runs this process
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class ProgressRelay:
    """The driver's end of rank 0's progress while a terminal draws bars: a Ray queue (no CPU)
    the worker puts each line on, and a thread that logs them here as progress records."""

    def __init__(self) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=1000, actor_options={"num_cpus": 0})
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._drain, name="unclip-progress", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        from ray.util.queue import Empty

        from unclip.datasets.progress_records import progress_extra

        while True:
            try:
                label, step, max_steps, line = self.queue.get(timeout=0.5)
            except Empty:
                if self.stop.is_set():
                    return  # stopped, and nothing left to log
                continue
            except Exception:  # the queue's actor is gone (Ray shut down): no more progress
                return
            log.info("%s", line, extra=progress_extra(label, step, max_steps))

    def close(self) -> None:
        """Log what is left, then stop the thread and the queue."""
        self.stop.set()
        self.thread.join(timeout=10)
        with contextlib.suppress(Exception):
            self.queue.shutdown()
