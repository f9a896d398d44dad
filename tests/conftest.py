"""Shared fixtures: a 2-CPU local Ray per test module, CPU DeepSpeed, an S3 API server and a
PostgreSQL server on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from unclip.datasets.ray_runtime import set_embedded_ray_env

os.environ.setdefault("DS_ACCELERATOR", "cpu")
set_embedded_ray_env()  # ray_local's Ray runs as the embedded one does


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with 2 CPUs, shut down when the module's tests are done."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def s3_root(monkeypatch):
    """An S3 API server (moto) on 127.0.0.1 with a fresh bucket; yields ``s3://bucket``."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server._server.server_port
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "NO_PROXY": "127.0.0.1",
    }.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"unclip-test-{uuid.uuid4().hex[:8]}"  # moto keeps buckets for the whole process
    s3fs.S3FileSystem().mkdir(bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


@dataclass(frozen=True)
class PostgresDatabase:
    """A fresh database on the test run's PostgreSQL server (TCP on 127.0.0.1, password auth)."""

    port: int
    db_name: str
    username: str = "dagster"
    password: str = "unclip-test-password"


def _postgres_bin() -> Path:
    """The server binaries of pgserver, the pip-packaged PostgreSQL the test extra installs."""
    from pgserver._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _run_as(user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--"] if user else []


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for the whole run, on 127.0.0.1 with password (scram) auth over TCP.

    Postgres refuses to run as root: as root the server runs as pgserver's own system user,
    set up (user, folder permissions) by pgserver the way its ``get_server`` does.
    """
    bin_dir = _postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="unclip-pg-"))
    user = None
    if os.geteuid() == 0:
        from pgserver.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        user = "pgserver"
        ensure_user_exists(user)
        ensure_prefix_permissions(bin_dir)
        ensure_folder_permissions(bin_dir, 0o055)
        ensure_folder_permissions(bin_dir.parent / "lib", 0o044)
        ensure_prefix_permissions(root)
        shutil.chown(root, user)
    database = PostgresDatabase(port=_free_port(), db_name="postgres")
    data = root / "data"
    (root / "pw").write_text(database.password)
    shutil.chown(root / "pw", user) if user else None
    pg_ctl = [*_run_as(user), str(bin_dir / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run(
            [*_run_as(user), str(bin_dir / "initdb"), "-D", str(data), "-U", database.username]
            + ["--auth-host=scram-sha-256", "--auth-local=trust", f"--pwfile={root / 'pw'}"],
            check=True,
            capture_output=True,
        )
        options = f"-h 127.0.0.1 -p {database.port} -k {root} -c fsync=off"
        # The server's output goes to a log file: a pipe would stay open as long as it runs.
        subprocess.run(
            [*pg_ctl, "-o", options, "-l", str(root / "log"), "-w", "-t", "60", "start"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=90,
        )
        yield database, root
    finally:
        subprocess.run(
            [*pg_ctl, "-m", "immediate", "stop"],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres(postgres_server) -> PostgresDatabase:
    """A new, empty database on the run's PostgreSQL server."""
    server, socket_dir = postgres_server
    db = PostgresDatabase(port=server.port, db_name=f"unclip_{uuid.uuid4().hex[:10]}")
    subprocess.run(
        [str(_postgres_bin() / "psql"), "-h", str(socket_dir), "-p", str(db.port)]
        + ["-U", db.username, "-d", "postgres", "-c", f"CREATE DATABASE {db.db_name}"],
        check=True,
        capture_output=True,
    )
    return db


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
