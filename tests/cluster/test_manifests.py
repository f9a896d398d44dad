"""cluster/: every YAML parses, names the right kinds and entrypoints, and keeps storage shared."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from shrunk_config import REPO

from unclip.pipelines.config import load_config

CLUSTER = REPO / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))
KUBERAY = {"RayCluster", "RayJob", "RayCronJob"}


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _by_kind() -> dict[str, dict]:
    found = {}
    for path in YAMLS:
        for doc in _docs(path):
            if isinstance(doc, dict) and "kind" in doc:
                found[doc["kind"]] = doc
    return found


def _strings(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _env(containers: list[dict]) -> dict[str, str]:
    return {e["name"]: e.get("value") for c in containers for e in c.get("env", [])}


def _cluster_specs(doc: dict) -> list[dict]:
    """The RayCluster specs a manifest defines (itself, a RayJob's, a RayCronJob's template)."""
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        return [spec]
    if doc["kind"] == "RayJob":
        return [spec["rayClusterSpec"]]
    return [spec["jobTemplate"]["rayClusterSpec"]]


def test_every_yaml_parses_and_says_storage_is_shared():
    names = {p.relative_to(CLUSTER).as_posix() for p in YAMLS}
    assert {
        "ray-up-aws.yaml",
        "runtime_env.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/raycronjob.yaml",
    } <= names
    for path in YAMLS:
        docs = _docs(path)
        assert docs, f"{path} is empty"
        # No value stores anything under /tmp: storage is s3:// (or NFS) on every node.
        for s in (s for d in docs for s in _strings(d)):
            assert "/tmp" not in s, f"{path}: {s!r} points at /tmp"
        # ... and each file says so to the person editing it.
        text = path.read_text()
        assert re.search(r"never .*/tmp", text, re.IGNORECASE), (
            f"{path} lacks the shared-storage warning"
        )


def test_kuberay_manifests_kinds_api_and_entrypoints():
    kinds = _by_kind()
    assert KUBERAY <= set(kinds)
    for kind in KUBERAY:
        doc = kinds[kind]
        assert doc["apiVersion"] == "ray.io/v1", kind
        assert doc["metadata"]["name"]
        for spec in _cluster_specs(doc):
            assert spec["rayVersion"] == "2.60.0"
            head = spec["headGroupSpec"]
            assert head["rayStartParams"]["num-cpus"] == "0", "no work on the head"
            groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
            assert {"cpu", "gpu"} <= set(groups), kind
            gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
            assert gpu["limits"]["nvidia.com/gpu"] == gpu["requests"]["nvidia.com/gpu"]
            for template in [head["template"]] + [g["template"] for g in groups.values()]:
                env = _env(template["spec"]["containers"])
                assert env["UNCLIP_STORAGE"].startswith("s3://"), (kind, env)

    job, cron = kinds["RayJob"]["spec"], kinds["RayCronJob"]["spec"]
    for spec in (job, cron["jobTemplate"]):
        assert spec["entrypoint"].split()[:2] == ["unclip", "run"]
        config = REPO / spec["entrypoint"].split()[2]
        assert load_config(config).storage.startswith("s3://")
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert runtime_env["env_vars"]["UNCLIP_STORAGE"].startswith("s3://")
    # RayCronJob (alpha, KubeRay >= 1.6): schedule + jobTemplate holding a RayJob spec.
    assert len(cron["schedule"].split()) == 5
    assert "spec" not in cron["jobTemplate"]


def test_runtime_env_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    raw = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    env = RuntimeEnv(**raw)
    assert env["working_dir"] == "."
    assert env["env_vars"]["UNCLIP_STORAGE"].startswith("s3://")
    assert env["pip"]["packages"] == ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"]


def test_ray_up_config_matches_the_launcher_schema():
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "ray-up-aws.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert {"head", "cpu_worker", "gpu_worker"} <= set(types)
    assert config["head_node_type"] == "head"
    assert "p4d" in types["gpu_worker"]["node_config"]["InstanceType"]
    commands = "\n".join(config["head_start_ray_commands"])
    assert "RAY_ADDRESS=" in commands and "UNCLIP_STORAGE=s3://" in commands
    assert config["docker"]["image"]


def test_dockerfile_copies_existing_paths():
    lines = (CLUSTER / "Dockerfile").read_text().splitlines()
    sources = [src for ln in lines if ln.startswith("COPY") for src in ln.split()[2:-1]]
    assert {"pyproject.toml", "datasets", "training", "pipelines", "configs"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), src
    assert any(ln.startswith("RUN pip install") for ln in lines)


def test_the_job_api_is_never_open_without_a_token():
    """Every KubeRay pod runs with token auth from a Secret; ray up binds the dashboard to loopback."""
    for kind in sorted(KUBERAY):
        doc = _by_kind()[kind]
        for spec in _cluster_specs(doc):
            groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
            for group in groups:
                for c in group["template"]["spec"]["containers"]:
                    env = {e["name"]: e for e in c.get("env", [])}
                    assert env["RAY_AUTH_MODE"]["value"] == "token", (kind, c["name"])
                    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
                    assert ref == {"name": "unclip-ray-auth", "key": "token"}, (kind, c["name"])
    up = yaml.safe_load((CLUSTER / "ray-up-aws.yaml").read_text())
    head = " ".join(up["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for commands in (up["head_start_ray_commands"], up["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert start.startswith("RAY_AUTH_MODE=token ray start"), start
        assert any("~/.ray/auth_token" in c for c in commands)


def _head_and_workers(spec: dict) -> tuple[dict[str, dict], list[dict[str, dict]]]:
    """The env entries (name → entry) of a cluster spec's head container and of each worker's."""

    def env(group: dict) -> dict[str, dict]:
        (container,) = group["template"]["spec"]["containers"]
        return {e["name"]: e for e in container.get("env", [])}

    return env(spec["headGroupSpec"]), [env(g) for g in spec["workerGroupSpecs"]]


def test_the_driver_on_the_head_gets_the_dagster_password_and_the_workers_do_not():
    """`unclip run` on the head opens the Postgres instance the config names; its password comes
    from the same Secret the Dagster services read, and stays off the worker pods."""
    laion = load_config(REPO / "configs" / "laion.yaml")
    password_env = laion.instance.postgres.password_env
    instance = yaml.safe_load((CLUSTER / "dagster" / "dagster.yaml").read_text())
    assert instance["storage"]["postgres"]["postgres_db"]["password"] == {"env": password_env}
    for kind in sorted(KUBERAY):
        for spec in _cluster_specs(_by_kind()[kind]):
            head, workers = _head_and_workers(spec)
            ref = head[password_env]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "unclip-dagster-postgres", "key": "password"}, kind
            assert all(password_env not in w for w in workers), kind
    up = yaml.safe_load((CLUSTER / "ray-up-aws.yaml").read_text())
    head = "\n".join(up["head_start_ray_commands"])
    assert f"export {password_env}=" in head and "unclip/dagster-pg-password" in head
    assert password_env not in "\n".join(up["worker_start_ray_commands"])


def test_the_image_installs_the_object_storage_and_postgres_extras():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(r.startswith("s3fs") for r in extras["s3"])
    assert any(r.startswith("gcsfs") for r in extras["gcs"])
    assert any(r.startswith("dagster-postgres") for r in extras["postgres"])
    lines = (CLUSTER / "Dockerfile").read_text().splitlines()
    (install,) = [ln for ln in lines if ln.startswith("RUN pip install")]
    wanted = install.split('".[', 1)[1].split(']"', 1)[0].split(",")
    assert {"s3", "gcs", "postgres"} <= set(wanted), install
    # the tests that use S3 and Postgres servers run under the test extra, never skip
    assert {"s3fs", "moto[server]", "dagster-postgres", "pgserver"} <= {
        re.split(r"[<>=!~ ]", r, maxsplit=1)[0] for r in extras["test"]
    }
