"""Run the Dagster UI (``dagster dev``) from this interpreter, and stop all of it when asked.

``dagster dev`` starts a webserver, a daemon and a code server as its children. A terminal's
Ctrl-C, a pod's SIGTERM or a closed terminal's SIGHUP must stop every one of them promptly,
whether or not the signal reached them too: ``dagster dev`` runs in a process group of its
own, is interrupted (its graceful path) and, after a short grace period, the whole group is
killed. POSIX only, like the rest of the project.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

# What `dagster dev` imports (import name → the distribution that provides it).
UI_MODULES = {"dagster": "dagster", "dagster_webserver": "dagster-webserver"}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Seconds between the interrupt and SIGKILL: Kubernetes' own grace period is 30 s.
STOP_GRACE_S = 5.0


def missing_distributions() -> list[str]:
    """The UI's distributions that this interpreter cannot import."""
    return [dist for mod, dist in UI_MODULES.items() if importlib.util.find_spec(mod) is None]


def missing_message(missing: list[str]) -> str:
    """Say what is missing, and for which interpreter, with the command that installs it."""
    return (
        f"the Dagster UI needs {' and '.join(missing)}, which {sys.executable} cannot import: "
        f"{sys.executable} -m pip install {' '.join(missing)}"
    )


def dev_command(port: int, host: str) -> list[str]:
    """``dagster dev`` on the pipeline's definitions, run by this interpreter (no PATH lookup)."""
    return [
        sys.executable,
        "-m",
        "dagster",
        "dev",
        "-m",
        "unclip.pipelines.definitions",
        "-p",
        str(port),
        "-h",
        host,
    ]


def run_until_stopped(
    cmd: list[str], env: dict[str, str], cwd: str | Path | None = None, grace: float = STOP_GRACE_S
) -> int:
    """Run ``cmd`` in its own process group until it exits or this process is signalled.

    On SIGINT, SIGTERM or SIGHUP the group gets SIGINT, then SIGKILL when its leader is done
    or after ``grace`` seconds; the return value is the command's exit code, or 128 + the signal's number when stopped.
    """
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True)
        try:
            while proc.poll() is None and not stop.wait(0.2):
                pass
        finally:
            # Also when the command exited by itself: none of its children outlive it.
            stop_group(proc, grace)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 + received[0] if received else int(proc.returncode)


def stop_group(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """Interrupt the process group led by ``proc``; kill what is left once it is done.

    The interrupt is ``dagster dev``'s graceful path (it stops its webserver and daemon);
    whatever outlives the leader, or the ``grace`` seconds, is killed.
    """
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    if _signal_group(pgid, signal.SIGINT):
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(pgid, signal.SIGKILL)
    proc.wait()


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the group; False when no process is left in it."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True
