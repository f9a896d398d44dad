"""The embedded Ray that ``ensure_started`` starts: its workers run the setup hook."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import logging
    import os
    import ray
    from unclip.datasets.ray_runtime import (
        PLACEMENT_GROUP_CLEANER_LOGGER, RaySettings, configure, ensure_started,
    )

    configure(RaySettings(num_cpus=1))
    ensure_started()

    @ray.remote
    def cleaner_level():
        return logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).getEffectiveLevel()

    @ray.remote
    class Detached:
        def level(self):
            return logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).getEffectiveLevel()

        def poll_interval(self):
            return os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")

    actor = Detached.options(lifetime="detached").remote()
    print("LEVELS", ray.get(cleaner_level.remote()), ray.get(actor.level.remote()))
    print("POLL", ray.get(actor.poll_interval.remote()))
    """
)


def test_embedded_ray_workers_silence_the_placement_group_cleaner(tmp_path):
    """Ray Train's cleaner polls the State API, which the embedded Ray (no dashboard) does not
    serve: without the hook every poll prints a warning into the run's output. Its actors (Ray
    Train's controller is one) poll their workers every 0.5 s."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")  # conftest sets it
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    levels = out.stdout.split("LEVELS ", 1)[1].split()
    assert levels[:2] == [str(logging.ERROR)] * 2  # tasks and detached actors alike
    assert out.stdout.split("POLL ", 1)[1].split()[0] == "0.5"
