"""Training progress lines: step / max, loss, steps/s, ETA; a handler where a Ray worker has none."""

from __future__ import annotations

import subprocess
import sys

import pytest

from unclip.training.engine.progress import TrainProgress, format_duration


@pytest.mark.parametrize(
    "seconds, text", [(0, "0s"), (44.6, "45s"), (185, "3m05s"), (7620, "2h07m"), (-3, "0s")]
)
def test_durations_read_short(seconds, text):
    assert format_duration(seconds) == text


def test_a_line_has_step_loss_rate_and_the_time_left():
    now = [100.0]
    progress = TrainProgress("prior p-1", start_step=10, max_steps=110, clock=lambda: now[0])
    now[0] = 110.0  # 10 steps in 10 s
    line = progress.line(20, {"loss": 0.123456, "samples_per_s": 64.0, "lr": 1e-3})
    assert line == "prior p-1 step 20/110 (18%) loss 0.1235 1 steps/s 64 samples/s ETA 1m30s"
    now[0] = 115.0  # the next 20 steps in 5 s: the rate is the window's, the ETA the life's
    line = progress.line(40, {"loss": 0.1})
    assert (
        "step 40/110 (36%)" in line and "4 steps/s" in line and "ETA 35s" in line
    )  # 30 steps in 15 s, 70 left
    now[0] = 130.0
    assert progress.line(110, {"loss": 0.05}).endswith("done")


def test_a_process_without_logging_config_gets_the_lines_on_stderr():
    """A Ray worker's root logger has no handler: progress still reaches its stderr."""
    code = (
        "from unclip.training.engine.progress import TrainProgress, ensure_progress_handler\n"
        "ensure_progress_handler(); ensure_progress_handler()\n"
        "TrainProgress('decoder d-1', 0, 8).log(4, {'loss': 0.5})\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "decoder d-1" in ln]
    assert len(lines) == 1 and "step 4/8 (50%) loss 0.5" in lines[0]


def test_a_relay_brings_a_workers_progress_to_the_driver_as_progress_records(ray_local, caplog):
    import logging

    from unclip.datasets.progress_records import progress_of
    from unclip.training.engine.progress import ProgressRelay

    def worker_logs(relay_queue, steps: list[int]) -> None:  # rank 0: a line per logged step
        progress = TrainProgress("decoder d-1", start_step=0, max_steps=10, relay=relay_queue)
        for s in steps:
            progress.log(s, {"loss": 1.0 / s})

    relay = ProgressRelay()
    with caplog.at_level(logging.INFO, logger="unclip.training.progress"):
        ray_local.get(ray_local.remote(worker_logs).remote(relay.queue, [2, 4, 10]))
        relay.close()  # logs whatever is still queued
    got = [progress_of(r) for r in caplog.records]
    assert got == [
        ("decoder d-1", 2.0, 10.0),
        ("decoder d-1", 4.0, 10.0),
        ("decoder d-1", 10.0, 10.0),
    ]
    assert caplog.records[-1].getMessage().startswith("decoder d-1 step 10/10 (100%) loss 0.1")
