import dagster as dg
import yaml

from unclip.pipelines.cli_output import StageBoard
from unclip.pipelines.definitions import build_definitions
from unclip.pipelines.runner import STAGES, PipelineRun, plan_phases, upstream_of
from unclip.pipelines.values import IngestSummary


def test_partition_outputs_sum_counts_over_sources():
    run = PipelineRun(True, "r", "home")
    run.outputs["image_shards"] = {
        "a": IngestSummary(
            "a", shards_written=2, shards_skipped=0, successes=4, failures=0, skipped=False
        ),
        "b": IngestSummary(
            "b", shards_written=1, shards_skipped=3, successes=2, failures=1, skipped=False
        ),
    }
    assert run.total("image_shards", "shards_written") == 3
    assert run.total("image_shards", "failures") == 1
    assert [s.source for s in run.outputs["image_shards"].values()] == ["a", "b"]
    assert run.total("embeddings", "shards_written") == 0


def _names(phases):
    return [([k.to_user_string() for k in p.assets], p.partitioned, p.job) for p in phases]


def test_phases_cover_every_stage_once_in_dependency_order(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"storage": str(tmp_path / "store")}))
    defs = build_definitions(str(config))
    phases = _names(plan_phases(defs, dg.AssetSelection.all()))
    ordered = [s for names, _, _ in phases for s in names]
    assert sorted(ordered) == sorted(STAGES)
    assert ordered.index("image_shards") < ordered.index("clip_model") < ordered.index("embeddings")
    assert [p for names, p, _ in phases if "embeddings" in names] == [True]
    # each phase runs as one of the jobs the UI shows
    assert [job for _, _, job in phases] == [
        "ingest_source",
        "bootstrap_clip",
        "ingest_source",
        "retrain",
    ]
    # a single-stage command selects its upstream and nothing downstream
    prior_only = _names(plan_phases(defs, upstream_of(["prior"])))
    assert prior_only[-1] == (["curated_embeddings", "dataset_manifest", "prior"], False, "retrain")


def test_stage_board_sums_the_runs_of_a_partitioned_stage(monkeypatch):
    clock = iter([0.0, 2.0, 10.0, 13.0])
    monkeypatch.setattr("unclip.pipelines.cli_output.time.monotonic", lambda: next(clock))
    board = StageBoard(["image_shards"])
    for event in ("start", "success", "start", "success"):
        board(event, "image_shards")
    assert board.runs["image_shards"] == 2
    assert board.seconds["image_shards"] == 5.0
    assert board.state["image_shards"] == "done"


def test_retrain_clip_unpins_the_bootstrap_clip(tmp_path):
    import json

    from typer.testing import CliRunner

    from unclip.datasets.storage import StorageLayout
    from unclip.pipelines.cli import app
    from unclip.pipelines.config import parse_config
    from unclip.training.models.clip_pin import unpin_clip

    cfg = parse_config({"storage": str(tmp_path / "store")})
    layout = StorageLayout(cfg.storage)
    pin = tmp_path / "store" / "runs" / "clip" / "latest.json"
    assert unpin_clip(layout) is False
    pin.parent.mkdir(parents=True)
    pin.write_text(json.dumps({"run": "clip-x", "sources": ["a"], "clip_id": "c"}))
    assert unpin_clip(layout) is True and not pin.exists()
    assert "--retrain-clip" in CliRunner().invoke(app, ["run", "--help"]).output


def test_a_second_run_on_the_same_storage_root_stops_naming_the_holder(tmp_path):
    import time

    import yaml
    from typer.testing import CliRunner

    from unclip.datasets.lease import Lease
    from unclip.datasets.storage import StorageLayout
    from unclip.pipelines.cli import app

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"storage": str(tmp_path / "store")}))
    holder = Lease(
        StorageLayout(str(tmp_path / "store")).lease("writer"), what="unclip run first.yaml"
    )
    holder.acquire()
    start = time.monotonic()
    result = CliRunner().invoke(app, ["run", str(config), "--wait", "1"])
    assert result.exit_code == 3, result.output
    said = " ".join(result.output.split())  # the console wraps long lines
    assert "held by unclip run first.yaml" in said and "after waiting 1 s" in said
    assert 1.0 <= time.monotonic() - start < 10
    assert not (tmp_path / "store" / "sources").exists()  # nothing was written
    holder.release()
