"""Start Ray at the moment a step has work for it, with the settings the pipeline chose.

Steps that find nothing to do never start Ray, so a re-run of a finished pipeline costs only
its checks. ``configure`` records how to start (the pipeline does it before its steps run);
``ensure_started`` starts or joins Ray on first use: the cluster at ``RAY_ADDRESS`` when set,
else an embedded Ray with the configured CPUs. Workers' output reaches the driver (training
progress lines among it), as ``ray job logs`` and ``kubectl logs`` show it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class RaySettings:
    """How to start an embedded Ray (ignored when ``RAY_ADDRESS`` names a cluster)."""

    num_cpus: int | None = None


_settings = RaySettings()


def configure(settings: RaySettings) -> None:
    """Record how the next ``ensure_started`` starts Ray; starts nothing."""
    global _settings
    _settings = settings


# The embedded Ray's environment. Ray Train's controller polls its workers every 2 s by default,
# and a run's start and end each wait for a poll; at 0.5 s a 3-step prior fit took 19.7-21.5 s
# instead of 23.6-24.2 (2 CPUs, four fits each), for a few more small RPCs. A cluster keeps its own.
EMBEDDED_RAY_ENV = {"RAY_TRAIN_V2_ENABLED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def set_embedded_ray_env() -> None:
    """Put :data:`EMBEDDED_RAY_ENV` into this process's environment, keeping a user's own
    values; before ``ray.init``, so that every process of the Ray it starts inherits them."""
    for name, value in EMBEDDED_RAY_ENV.items():
        os.environ.setdefault(name, value)


def ensure_started() -> None:
    """Join ``RAY_ADDRESS`` when set, else start an embedded Ray; a no-op once Ray runs."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    set_embedded_ray_env()
    ray.init(
        num_cpus=_settings.num_cpus,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={
            "worker_process_setup_hook": f"{__name__}.{silence_state_api_warnings.__name__}"
        },
    )


# Ray Train's placement-group cleaner asks the State API every second whether the run's
# controller lives. The State API is served by the dashboard, which the embedded Ray does not
# start, so every ask fails with a warning: hundreds of lines a run, over the progress lines.
# The embedded Ray dies with its driver, placement groups included, so the cleaner has nothing
# to clean; on a cluster (RAY_ADDRESS) the dashboard runs and its warnings stay on.
PLACEMENT_GROUP_CLEANER_LOGGER = (
    "ray.train.v2._internal.execution.controller.placement_group_cleaner"
)


def silence_state_api_warnings() -> None:
    """Worker setup hook of the embedded Ray: the cleaner's logger shows errors only."""
    import logging

    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
