"""A real fit, run as the CLI runs it (Ray started by ``ensure_started``): its progress lines reach
the driver's output, and ``report_to: tensorboard`` leaves the run's scalars in its folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from unclip.training.engine.runlog import read_rows

TESTS = Path(__file__).resolve().parents[1]

FIT = textwrap.dedent(
    """
    import sys
    from tiny import tiny_trainer
    from training_helpers import Regression
    from unclip.datasets.ray_runtime import RaySettings, configure, ensure_started
    from unclip.datasets.storage import StorageLayout
    from unclip.training.engine.trainer import fit

    configure(RaySettings(num_cpus=2))
    ensure_started()
    cfg = tiny_trainer(report_to="tensorboard", checkpoint_every=6)
    result = fit(Regression(), cfg, StorageLayout(sys.argv[1]), "regression", "watched")
    print("RUN_DIR", result.run_dir)
    """
)


def test_a_fit_shows_progress_lines_and_writes_tensorboard_scalars(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "DS_ACCELERATOR": "cpu",
        "RAY_TRAIN_V2_ENABLED": "1",
    }
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-c", FIT, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "Failed to query Ray Train Controller" not in text  # no State API on the embedded Ray
    progress = [ln for ln in text.splitlines() if "regression watched step" in ln]
    steps = [int(ln.split(" step ", 1)[1].split("/")[0]) for ln in progress]
    assert steps == [2, 4, 6, 8, 10, 12], text[-4000:]  # every log_every steps, rank 0 only
    assert all(" loss " in ln and " steps/s" in ln for ln in progress)
    assert all(" ETA " in ln for ln in progress[:-1]) and progress[-1].endswith("done")

    run_dir = text.split("RUN_DIR ", 1)[1].split()[0]
    rows = read_rows(os.path.join(run_dir, "metrics.jsonl"))
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in loss] == [r["step"] for r in rows] == steps
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    fit_json = json.loads(open(os.path.join(run_dir, "export", "fit.json")).read())
    (final,) = acc.Scalars("export/eval_mse")  # the export's own metrics, at the last step
    assert final.step == 12 and final.value == pytest.approx(fit_json["metrics"]["eval_mse"])
