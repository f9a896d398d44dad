"""Drive cluster/local-cluster.sh and `unclip` subprocesses against it (cluster tests' helper)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shrunk_config import REPO

SCRIPT = REPO / "cluster" / "local-cluster.sh"


def free_port() -> int:
    """A GCS port no other Ray on this machine is using (the next one is the dashboard's)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 60000:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port


@dataclass
class LocalCluster:
    """A head and a worker node started by cluster/local-cluster.sh, all on this machine."""

    port: int
    dir: Path
    object_store_mb: int = 160

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def sh(self, command: str, timeout: float = 180) -> str:
        """Run a local-cluster.sh subcommand for this cluster; its output, or raise."""
        args = [str(SCRIPT), command, "--port", str(self.port), "--dir", str(self.dir)]
        args += ["--object-store-mb", str(self.object_store_mb)]
        env = self.env()
        del env["RAY_ADDRESS"]  # the nodes' own processes inherit this environment
        done = subprocess.run(
            ["nice", "-n", "5", *args], capture_output=True, text=True, timeout=timeout, env=env
        )
        if done.returncode != 0:
            raise RuntimeError(f"{command} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done.stdout

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a driver on this cluster: RAY_ADDRESS + token auth, CPU DeepSpeed."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update(
            RAY_ADDRESS=self.address,
            RAY_AUTH_MODE="token",
            DS_ACCELERATOR="cpu",
            RAY_TRAIN_V2_ENABLED="1",
            # A Train worker group waits this long for its nodes (the restarted worker).
            RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="120",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def node_ids(self) -> dict[str, str]:
        """{"head": node id, "worker": node id} of the alive nodes, from `status`."""
        out = {}
        for line in self.sh("status").splitlines():
            role, node_id, *_ = line.split()
            out[role] = node_id
        return out

    def worker_logs(self, node: str) -> str:
        """Concatenated stdout of every Ray worker process the node has run."""
        logs = sorted((self.dir / node).glob("session_*/logs/worker-*.out"))
        return "".join(p.read_text(errors="replace") for p in logs)


def unclip(cluster: LocalCluster, cwd: Path, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """Start `unclip ARGS` as a driver on ``cluster``, its output going to ``log``."""
    env = cluster.env(DAGSTER_HOME=str(cwd / "dagster"))
    (cwd / "dagster").mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            ["nice", "-n", "5", "unclip", *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for(
    what: str, check: Callable[[], bool], proc: subprocess.Popen | None, timeout: float
) -> None:
    """Poll ``check`` until true; fail early when ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the driver exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.5)


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    """Wait for a driver; its log, or an assertion error carrying the log's tail."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"driver ran past {timeout:g} s:\n{log.read_text()[-4000:]}") from None
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"driver failed ({proc.returncode}):\n{text[-6000:]}"
    return text
