"""`unclip ui`: found without an activated venv, and stopped with all of `dagster dev`'s children."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from unclip.pipelines import ui
from unclip.pipelines.cli import app

psutil = pytest.importorskip("psutil")

STARTUP_S = 240  # dagster dev imports torch in its code server: slow on a busy 2-CPU machine
STOPPED_WITHIN_S = 10


def test_the_error_names_what_is_missing_and_the_interpreter(tmp_path, monkeypatch):
    real = ui.importlib.util.find_spec
    monkeypatch.setattr(
        ui.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "dagster_webserver" else real(name, *a),
    )
    f = tmp_path / "c.yaml"
    f.write_text(f"storage: {tmp_path / 'store'}\n")
    result = CliRunner().invoke(app, ["ui", str(f)])
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "needs dagster-webserver," in out and "dagster and" not in out
    assert f"{sys.executable} -m pip install dagster-webserver" in out


def test_dagster_runs_on_this_interpreter_not_the_one_on_path():
    assert ui.dev_command(3111, "127.0.0.1")[:5] == [
        sys.executable,
        "-m",
        "dagster",
        "dev",
        "-m",
    ]


def test_a_command_that_ends_by_itself_leaves_no_child_behind(tmp_path):
    # The leader exits at once; its child (same group) would otherwise sleep for a minute.
    pidfile = tmp_path / "child.pid"
    code = (
        "import subprocess, sys; p = subprocess.Popen(['sleep', '60']); "
        f"open({str(pidfile)!r}, 'w').write(str(p.pid)); sys.exit(3)"
    )
    start = time.monotonic()
    rc = ui.run_until_stopped([sys.executable, "-c", code], dict(os.environ), grace=1.0)
    assert rc == 3
    assert time.monotonic() - start < 30  # not the child's minute
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5  # a signal is delivered asynchronously: allow it to land
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmdline(p) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_ui(proc: subprocess.Popen, port: int, log: Path) -> list:
    """Block until the webserver answers and webserver, daemon and code server all run."""
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as r:
                up = r.status == 200
        except OSError:
            up = False
        children = psutil.Process(proc.pid).children(recursive=True)
        lines = [_cmdline(c) for c in children]
        roles = {
            "dev": any(" dagster dev " in f" {ln} " for ln in lines),
            "webserver": any("dagster_webserver" in ln for ln in lines),
            "daemon": any("dagster._daemon" in ln for ln in lines),
            "code server": any("code-server" in ln or "api grpc" in ln for ln in lines),
        }
        if up and all(roles.values()):
            return children
        time.sleep(1)
    pytest.fail(f"the UI did not come up in {STARTUP_S} s: {log.read_text()[-3000:]}")


@pytest.mark.timeout(STARTUP_S + 60)
@pytest.mark.parametrize(
    "how", ["SIGTERM to the process (a pod stopping)", "SIGINT to the group (Ctrl-C)"]
)
def test_ui_starts_without_the_venv_on_path_and_stops_with_every_child(tmp_path, how):
    config = tmp_path / "c.yaml"
    config.write_text(f"storage: {tmp_path / 'store'}\n")
    port = _free_port()
    bindir = str(Path(sys.executable).parent)
    # As cron or systemd run it: by full path, the venv neither activated nor on PATH.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "DAGSTER_HOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != bindir)
    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(bindir) / "unclip"), "ui", str(config), "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group, like a shell's foreground job
        )
    children: list = []
    try:
        children = _wait_for_ui(proc, port, log)
        if how.startswith("SIGTERM"):
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        start = time.monotonic()
        try:
            proc.wait(timeout=STOPPED_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`unclip ui` still runs: {log.read_text()[-3000:]}")
        gone, alive = psutil.wait_procs(
            children, timeout=max(0.1, STOPPED_WITHIN_S - (time.monotonic() - start))
        )
        assert not alive, [_cmdline(p) for p in alive]
        assert time.monotonic() - start < STOPPED_WITHIN_S
        assert proc.returncode == 128 + (signal.SIGTERM if how.startswith("SIGTERM") else 2)
    finally:
        for p in [*children, psutil.Process(proc.pid) if proc.poll() is None else None]:
            if p is not None:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
        proc.wait(timeout=10)
