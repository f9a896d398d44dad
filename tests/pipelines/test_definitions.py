import dagster as dg
import pytest
import yaml
from dagster._config import validate_config
from dagster._core.instance.config import dagster_instance_config_schema
from tiny import ASSETS_IN_ORDER

from unclip.pipelines.config import load_config
from unclip.pipelines.definitions import build_definitions
from unclip.pipelines.instance import dagster_home, dagster_yaml

ASSETS = set(ASSETS_IN_ORDER)


def _config(tmp_path, **extra):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"storage": str(tmp_path / "store"), **extra}))
    return f


def test_definitions_load_with_partitions_jobs_sensor_and_schedule(tmp_path):
    f = _config(tmp_path, schedule={"cron": "0 4 * * 1", "timezone": "Europe/Paris"})
    defs = build_definitions(str(f))
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert ASSETS <= keys
    for name in ("url_lists", "image_shards", "embeddings"):
        pd = graph.get(dg.AssetKey(name)).partitions_def
        assert isinstance(pd, dg.DynamicPartitionsDefinition) and pd.name == "sources"
    for name in ASSETS - {"url_lists", "image_shards", "embeddings"}:
        assert graph.get(dg.AssetKey(name)).partitions_def is None, name
    parents = {k.to_user_string() for k in graph.get(dg.AssetKey("dataset_manifest")).parent_keys}
    assert parents == {"embeddings", "clip_model", "curated_embeddings"}
    curate_parents = graph.get(dg.AssetKey("curated_embeddings")).parent_keys
    assert {k.to_user_string() for k in curate_parents} == {"embeddings", "clip_model"}
    assert {k.to_user_string() for k in graph.get(dg.AssetKey("promotion")).parent_keys} == {
        "evaluation"
    }
    evaluation_parents = graph.get(dg.AssetKey("evaluation")).parent_keys
    assert dg.AssetKey("upsampler") in evaluation_parents
    assert dg.AssetKey("decoder") in graph.get(dg.AssetKey("upsampler")).parent_keys

    ingest = defs.resolve_job_def("ingest_source")
    assert ingest.partitions_def.name == "sources"
    retrain = defs.resolve_job_def("retrain")
    trained = ASSETS - {"url_lists", "image_shards", "clip_model", "embeddings"}
    assert trained <= set(retrain.graph.node_dict)
    assert "image_shards" not in retrain.graph.node_dict
    schedule = defs.resolve_schedule_def("retrain_schedule")
    assert schedule.cron_schedule == "0 4 * * 1"
    assert schedule.execution_timezone == "Europe/Paris"
    assert schedule.job_name == "retrain"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    sensor = defs.resolve_sensor_def("inbox")
    assert sensor.job_name == "ingest_source"
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


def test_code_versions_are_set_on_every_asset(tmp_path):
    defs = build_definitions(str(_config(tmp_path)))
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        assert graph.get(key).code_version, key


def test_every_asset_shows_a_description_and_the_group_in_the_ui(tmp_path):
    defs = build_definitions(str(_config(tmp_path)))
    graph = defs.resolve_asset_graph()
    described = {k.to_user_string(): graph.get(k).description for k in graph.get_all_asset_keys()}
    assert set(described) == set(ASSETS_IN_ORDER)
    assert all(d and len(d) > 40 for d in described.values()), described
    assert "img2dataset" in described["image_shards"]  # the asset's docstring
    assert "Diffusion prior trained" in described["prior"]
    assert {graph.get(k).group_name for k in graph.get_all_asset_keys()} == {"unclip"}


def test_module_definitions_load_from_unclip_config(tmp_path, monkeypatch):
    monkeypatch.setenv("UNCLIP_CONFIG", str(_config(tmp_path)))
    from unclip.pipelines import definitions

    defs = definitions.defs()
    assert defs.resolve_sensor_def("inbox") and defs.resolve_schedule_def("retrain_schedule")


def test_sqlite_instance_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    cfg = load_config(_config(tmp_path))
    home = dagster_home(cfg)
    assert home == str(tmp_path / "store" / "dagster")
    text = (tmp_path / "store" / "dagster" / "dagster.yaml").read_text()
    assert "postgres" not in text
    instance = dg.DagsterInstance.from_config(home)
    assert type(instance.run_storage).__name__ == "SqliteRunStorage"


def test_postgres_block_written_from_config(tmp_path, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    cfg = load_config(
        _config(
            tmp_path,
            instance={"postgres": {"hostname": "db.internal", "db_name": "unclip"}},
        )
    )
    doc = yaml.safe_load(dagster_yaml(cfg))
    assert doc["storage"]["postgres"]["postgres_db"] == {
        "hostname": "db.internal",
        "port": 5432,
        "db_name": "unclip",
        "username": "dagster",
        "password": {"env": "DAGSTER_PG_PASSWORD"},
        "scheme": "postgresql+psycopg2",
    }
    # valid against Dagster's own instance schema (no server needed to check that)
    assert validate_config(dagster_instance_config_schema(), doc).success
    # a file unclip wrote is regenerated when the config changes; a hand-written one is kept
    home = tmp_path / "store" / "dagster"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: true\n")
    dagster_home(cfg)
    assert "postgres" not in (home / "dagster.yaml").read_text()
    (home / "dagster.yaml").unlink()
    dagster_home(cfg)
    assert "db.internal" in (home / "dagster.yaml").read_text()


DEFINITIONS = "unclip.pipelines.definitions"


def test_dagster_itself_loads_the_module_unclip_ui_points_at(tmp_path):
    """What `unclip ui` runs (`dagster dev -m unclip.pipelines.definitions`) loads the code."""
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "UNCLIP_CONFIG": str(_config(tmp_path)),
        "DAGSTER_HOME": str(tmp_path / "home"),
    }
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    out = subprocess.run(
        # this interpreter's dagster, as `unclip ui` runs it (ui.dev_command)
        [sys.executable, "-m", "dagster", "definitions", "validate", "-m", DEFINITIONS],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Validation successful" in out.stdout + out.stderr


def test_module_definitions_use_unclip_storage_as_the_storage_root(tmp_path, monkeypatch):
    monkeypatch.setenv("UNCLIP_CONFIG", str(_config(tmp_path)))
    monkeypatch.setenv("UNCLIP_STORAGE", str(tmp_path / "elsewhere"))
    from unclip.pipelines import definitions

    resources = definitions.defs().resources
    assert resources["storage"].root == str(tmp_path / "elsewhere")
    assert resources["unclip"].load().storage == str(tmp_path / "elsewhere")
    assert resources["io_manager"].storage.root == str(tmp_path / "elsewhere")


def test_the_instance_written_from_the_config_keeps_runs_in_a_real_postgres(
    postgres, tmp_path, monkeypatch
):
    """`instance.postgres` → dagster.yaml → a Postgres instance that keeps a run across reopening;
    the password is read from the variable the config names, and a wrong one is refused."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    section = {"hostname": "127.0.0.1", "port": postgres.port, "db_name": postgres.db_name}
    cfg = load_config(_config(tmp_path, instance={"postgres": {**section, "username": "dagster"}}))
    home = dagster_home(cfg)

    @dg.asset
    def answer() -> int:
        return 42

    monkeypatch.setenv("DAGSTER_PG_PASSWORD", postgres.password)
    with dg.DagsterInstance.from_config(home) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert dg.materialize([answer], instance=instance).success
    with dg.DagsterInstance.from_config(home) as instance:  # a new process would see the same
        (run,) = instance.get_runs()
        assert run.is_success
        assert instance.get_latest_materialization_event(dg.AssetKey("answer")) is not None
    from dagster_postgres.utils import DagsterPostgresException

    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "not-the-password")
    with pytest.raises(DagsterPostgresException, match="DB connection"):
        dg.DagsterInstance.from_config(home).get_runs()
