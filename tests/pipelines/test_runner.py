from unclip.pipelines.cli import StageBoard
from unclip.pipelines.runner import PHASES, STAGES, _merge_partition_output


def test_partition_outputs_sum_counts_and_concatenate_sources():
    a = {"sources": [{"source": "a"}], "shards_written": 2, "clip_id": "c1", "skipped": False}
    b = {"sources": [{"source": "b"}], "shards_written": 1, "clip_id": "c1", "skipped": True}
    out = _merge_partition_output(_merge_partition_output(None, a), b)
    assert out["shards_written"] == 3
    assert [s["source"] for s in out["sources"]] == ["a", "b"]
    assert out["clip_id"] == "c1" and out["skipped"] is True


def test_phases_cover_every_stage_once_in_dependency_order():
    ordered = [s for names, _ in PHASES for s in names]
    assert sorted(ordered) == sorted(STAGES)
    assert ordered.index("image_shards") < ordered.index("clip_model") < ordered.index("embeddings")
    assert [p for names, p in PHASES if "embeddings" in names] == [True]


def test_stage_board_sums_the_runs_of_a_partitioned_stage(monkeypatch):
    clock = iter([0.0, 2.0, 10.0, 13.0])
    monkeypatch.setattr("unclip.pipelines.cli.time.monotonic", lambda: next(clock))
    board = StageBoard(["image_shards"])
    for event in ("start", "success", "start", "success"):
        board(event, "image_shards")
    assert board.runs["image_shards"] == 2
    assert board.seconds["image_shards"] == 5.0
    assert board.state["image_shards"] == "done"


def test_retrain_clip_unpins_the_bootstrap_clip(tmp_path):
    import json

    from typer.testing import CliRunner

    from unclip.pipelines.cli import app
    from unclip.pipelines.config import parse_config
    from unclip.pipelines.stages import unpin_clip

    cfg = parse_config({"storage": str(tmp_path / "store")})
    pin = tmp_path / "store" / "runs" / "clip" / "latest.json"
    assert unpin_clip(cfg) is False
    pin.parent.mkdir(parents=True)
    pin.write_text(json.dumps({"run": "clip-x", "sources": ["a"], "clip_id": "c"}))
    assert unpin_clip(cfg) is True and not pin.exists()
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
