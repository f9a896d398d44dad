"""cluster/dagster/: webserver, daemon and code server as separate services on the Postgres
instance, wired to each other, to the RayCluster and to the config; the instance file is valid
for Dagster and opens on a real Postgres."""

from __future__ import annotations

import importlib.util
import os
import time

import click
import yaml
from shrunk_config import REPO

from unclip.pipelines.config import load_config
from unclip.pipelines.instance import dagster_yaml

DAGSTER = REPO / "cluster" / "dagster"
KUSTOMIZATION = yaml.safe_load((DAGSTER / "kustomization.yaml").read_text())
CONFIGMAP = KUSTOMIZATION["configMapGenerator"][0]["name"]


def _objects() -> dict[tuple[str, str], dict]:
    """(kind, name) → object, over every file the kustomization applies."""
    out = {}
    for name in KUSTOMIZATION["resources"]:
        for doc in yaml.safe_load_all((DAGSTER / name).read_text()):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


OBJECTS = _objects()


def _container(name: str) -> dict:
    (container,) = OBJECTS[("Deployment", name)]["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def _cli(argv: list[str], home: str) -> click.Command:
    """Parse ``argv`` with the real console script's click command (nothing runs).

    Files mounted from the ConfigMap under ``home`` are read from this folder instead.
    """
    argv = [str(DAGSTER / a[len(home) + 1 :]) if a.startswith(home + "/") else a for a in argv]
    from dagster._cli import cli as dagster_cli
    from dagster._daemon.cli import cli as daemon_cli
    from dagster_webserver.cli import dagster_webserver

    commands = {"dagster": dagster_cli, "dagster-daemon": daemon_cli}
    commands["dagster-webserver"] = dagster_webserver
    cmd, args = commands[argv[0]], list(argv[1:])
    while isinstance(cmd, click.Group):
        name, args = args[0], args[1:]
        cmd = cmd.commands[name]
    cmd.make_context(argv[0], args)  # raises click.UsageError on an unknown option or value
    return cmd


def test_the_kustomization_applies_existing_files_and_every_service_is_real():
    for name in [*KUSTOMIZATION["resources"], *KUSTOMIZATION["configMapGenerator"][0]["files"]]:
        assert (DAGSTER / name).exists(), name
    deployments = {n for k, n in OBJECTS if k == "Deployment"}
    assert deployments == {
        "unclip-dagster-webserver",
        "unclip-dagster-daemon",
        "unclip-dagster-code",
    }
    commands = {n: _container(n)["command"] for n in deployments}
    # Long-running production services, each its own process: never `dagster dev` or `unclip ui`.
    assert commands["unclip-dagster-webserver"][0] == "dagster-webserver"
    assert commands["unclip-dagster-daemon"][:2] == ["dagster-daemon", "run"]
    assert commands["unclip-dagster-code"][:3] == ["dagster", "api", "grpc"]
    for name, command in commands.items():
        assert "dev" not in command and "unclip" != command[0]
        _cli(command, _env(_container(name))["DAGSTER_HOME"])
    daemon = OBJECTS[("Deployment", "unclip-dagster-daemon")]["spec"]
    assert daemon["replicas"] == 1 and daemon["strategy"]["type"] == "Recreate"
    probe = _container("unclip-dagster-webserver")["readinessProbe"]["httpGet"]
    assert probe["path"] == "/server_info"


def test_every_service_reads_the_postgres_instance_file():
    instance = yaml.safe_load((DAGSTER / "dagster.yaml").read_text())
    password_env = instance["storage"]["postgres"]["postgres_db"]["password"]["env"]
    for kind, name in OBJECTS:
        if kind != "Deployment":
            continue
        pod = OBJECTS[(kind, name)]["spec"]["template"]["spec"]
        container = _container(name)
        env = _env(container)
        home = env["DAGSTER_HOME"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for file in ("dagster.yaml", "workspace.yaml"):
            mount = mounts[f"{home}/{file}"]
            assert mount["subPath"] == file
            assert volumes[mount["name"]]["configMap"]["name"] == CONFIGMAP, name
        assert "emptyDir" in volumes[mounts[home]["name"]], "DAGSTER_HOME is writable scratch"
        assert env[password_env]["secretKeyRef"]["name"] == "unclip-dagster-postgres", name
        if name != "unclip-dagster-code":  # the workspace: definitions come from the code server
            assert f"{home}/workspace.yaml" in container["command"], name


def test_the_workspace_reaches_the_code_server_and_runs_reach_ray():
    (location,) = yaml.safe_load((DAGSTER / "workspace.yaml").read_text())["load_from"]
    grpc = location["grpc_server"]
    service = OBJECTS[("Service", grpc["host"])]["spec"]
    (port,) = service["ports"]
    code = _container("unclip-dagster-code")
    ports = {p["name"]: p["containerPort"] for p in code["ports"]}
    assert port["port"] == grpc["port"] == ports[port["targetPort"]]
    command = code["command"]
    assert command[command.index("--port") + 1] == str(grpc["port"])
    assert importlib.util.find_spec(command[command.index("--module-name") + 1])

    env = _env(code)
    # Runs are processes of the code server: it is the Ray driver, on the RayCluster's head.
    ray = yaml.safe_load((REPO / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    head = ray["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    gcs = {p["name"]: p["containerPort"] for p in head["ports"]}["gcs-server"]
    assert env["RAY_ADDRESS"] == f"{ray['metadata']['name']}-head-svc:{gcs}"
    assert env["RAY_AUTH_MODE"] == "token"
    assert code["image"] == head["image"], "the driver's Ray and Python match the cluster's"
    assert env["UNCLIP_STORAGE"].startswith("s3://")
    config = env["UNCLIP_CONFIG"]
    assert config.startswith(code["workingDir"] + "/")
    assert load_config(REPO / os.path.relpath(config, code["workingDir"])).storage.startswith(
        "s3://"
    )


def test_the_instance_file_is_valid_and_matches_the_config_instance_section():
    from dagster._core.instance.config import dagster_instance_config

    config, custom_class = dagster_instance_config(str(DAGSTER))
    assert custom_class is None
    assert "postgres" in config["storage"]
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    laion = load_config(REPO / "configs" / "laion.yaml")
    ours = yaml.safe_load(dagster_yaml(laion))
    # What `unclip run` writes for the config's instance section is this instance's storage.
    assert ours["storage"] == yaml.safe_load((DAGSTER / "dagster.yaml").read_text())["storage"]
    limits = config["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert limits == ours["run_queue"]["tag_concurrency_limits"]


def test_the_instance_opens_on_a_real_postgres(postgres, tmp_path, monkeypatch):
    import dagster as dg

    doc = yaml.safe_load((DAGSTER / "dagster.yaml").read_text())
    db = doc["storage"]["postgres"]["postgres_db"]
    # the shipped file, pointed at this server
    db.update(hostname="127.0.0.1", port=postgres.port, db_name=postgres.db_name)
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(doc))
    monkeypatch.setenv(db["password"]["env"], postgres.password)
    start = time.monotonic()
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert type(instance.run_launcher).__name__ == "DefaultRunLauncher"
        assert instance.get_runs() == []
    assert time.monotonic() - start < 120
