"""``trainer.report_to``: TensorBoard event files read back, resumes, remote run folders, missing packages."""

from __future__ import annotations

import fsspec
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from unclip.training.config import TrainerConfig
from unclip.training.engine import trackers as trackers_module
from unclip.training.engine.trackers import (
    Trackers,
    check_trackers,
    numeric_entries,
    report_evaluation,
)
from unclip.training.engine.trainer import validate_trainer_config


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every scalar TensorBoard shows for ``log_dir``."""
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {
        tag: [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
    }


def life(run_dir: str, start: int, steps: range, offset: float) -> None:
    t = Trackers.open(["tensorboard"], run_dir, "r-1", {"lr": 1e-3}, start)
    for s in steps:
        t.log(s, {"step": s, "loss": offset + s, "lr": 0.5, "ok": True, "note": "x"})
        if s == 4:
            t.flush()  # a checkpoint
    t.close()


def test_tensorboard_gets_each_rows_scalars_under_the_run_folder(tmp_path):
    life(str(tmp_path), 0, range(2, 9, 2), offset=0.0)
    got = read_scalars(tmp_path / "tensorboard")
    assert set(got) == {"train/loss", "train/lr"}  # not the step, a flag or a string
    assert got["train/loss"] == [(2, 2.0), (4, 4.0), (6, 6.0), (8, 8.0)]


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint(tmp_path):
    life(str(tmp_path), 0, range(2, 9, 2), offset=0.0)  # died after logging 6 and 8
    life(str(tmp_path), 4, range(6, 11, 2), offset=100.0)  # resumed from the step-4 checkpoint
    got = read_scalars(tmp_path / "tensorboard")["train/loss"]
    assert got == [(2, 2.0), (4, 4.0), (6, 106.0), (8, 108.0), (10, 110.0)]


def test_a_remote_run_folder_gets_the_event_files_at_each_flush(tmp_path):
    run_dir = f"memory://trackers-{tmp_path.name}/run"
    life(run_dir, 0, range(2, 5, 2), offset=0.0)
    fs = fsspec.filesystem("memory")
    files = fs.find(f"/trackers-{tmp_path.name}/run/tensorboard")
    assert files and all("events.out.tfevents" in f for f in files)
    local = tmp_path / "copy"
    local.mkdir()
    for f in files:
        (local / f.rsplit("/", 1)[-1]).write_bytes(fs.cat(f))
    assert read_scalars(local)["train/loss"] == [(2, 2.0), (4, 4.0)]


def test_report_to_takes_none_a_name_or_a_list_and_names_a_bad_one():
    assert TrainerConfig().report_to == []
    assert TrainerConfig(report_to="none").report_to == []
    assert TrainerConfig(report_to="tensorboard").report_to == ["tensorboard"]
    assert TrainerConfig(report_to=["tensorboard", "wandb"]).report_to == ["tensorboard", "wandb"]
    with pytest.raises(Exception, match="report_to"):
        TrainerConfig(report_to=["comet"])


def test_a_tracker_whose_package_is_missing_stops_the_run_before_training(monkeypatch):
    monkeypatch.setitem(trackers_module.TRACKER_MODULES, "mlflow", "unclip_no_such_package")
    with pytest.raises(ValueError, match=r"'mlflow' needs .* pip install 'unclip\[mlflow\]'"):
        validate_trainer_config(TrainerConfig(report_to=["mlflow"]))
    check_trackers(["tensorboard"])  # installed with the test extra


def test_only_numbers_are_scalars():
    assert numeric_entries({"step": 3, "loss": 1, "lr": 0.5, "ok": True, "name": "a"}) == {
        "loss": 1.0,
        "lr": 0.5,
    }


def test_wandb_offline_records_each_rows_scalars_under_the_run_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = Trackers.open(["wandb"], str(tmp_path), "prior-abc", {"lr": 0.1}, 0)
    for s in (2, 4):
        t.log(s, {"step": s, "loss_simple": 1.0 / s, "note": "x"})
    t.close()
    (record,) = list(tmp_path.glob("wandb/offline-run-*-prior-abc/run-prior-abc.wandb"))
    assert b"loss_simple" in record.read_bytes()


def test_mlflow_records_each_rows_scalars_and_the_params_in_a_local_store(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t = Trackers.open(["mlflow"], str(tmp_path), "decoder-abc", {"lr": 0.1}, 0)
    for s in (2, 4):
        t.log(s, {"step": s, "loss": 1.0 / s, "lr": 0.5, "note": "x"})
    t.close()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "decoder-abc" and run.data.params == {"lr": "0.1"}
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(2, 0.5), (4, 0.25)]
    assert set(run.data.metrics) == {"train/loss", "train/lr"}


def _grid_png(path) -> str:
    from PIL import Image

    Image.new("RGB", (8, 4), (200, 30, 10)).save(path)
    return str(path)


def test_an_evaluation_reaches_tensorboard_as_scalars_and_its_sample_grid(tmp_path):
    life(str(tmp_path), 0, range(2, 9, 2), offset=0.0)
    grid = _grid_png(tmp_path / "samples.png")
    report_evaluation(
        ["tensorboard"],
        str(tmp_path),
        "r-1",
        8,
        {"fd_clip": 0.25, "clip_score": 90.0},
        {"samples": grid},
    )
    got = read_scalars(tmp_path / "tensorboard")
    assert got["eval/fd_clip"] == [(8, 0.25)] and got["eval/clip_score"] == [(8, 90.0)]
    assert got["train/loss"][-1] == (8, 8.0)  # the training's own scalars are kept
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    (image,) = acc.Images("eval/samples")
    assert (image.step, image.width, image.height) == (8, 8, 4)


def test_mlflow_resumes_the_runs_mlflow_run_for_a_resume_and_for_its_evaluation(
    tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # artifacts go to the run folder, not the working one
    for steps in ((2, 4), (6,)):  # trained to 4, then resumed to 6
        t = Trackers.open(["mlflow"], str(tmp_path), "decoder-abc", {"lr": 0.1}, steps[0] - 2)
        for s in steps:
            t.log(s, {"step": s, "loss": 1.0 / s})
        t.close()
    grid = _grid_png(tmp_path / "samples.png")
    report_evaluation(
        ["mlflow"], str(tmp_path), "decoder-abc", 6, {"fd_clip": 0.5}, {"samples": grid}
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [2, 4, 6]
    assert run.data.metrics["eval/fd_clip"] == 0.5
    (folder,) = client.list_artifacts(run.info.run_id, "eval/samples")
    assert [a.path for a in client.list_artifacts(run.info.run_id, folder.path)] == [
        f"{folder.path}/samples.png"
    ]
    assert list((tmp_path / "cwd").iterdir()) == []
    (kept,) = (tmp_path / "mlflow-artifacts").rglob("samples.png")
    assert kept.read_bytes() == (tmp_path / "samples.png").read_bytes()


def test_no_tracker_named_means_nothing_is_opened(tmp_path):
    report_evaluation([], str(tmp_path), "r-1", 3, {"fd_clip": 1.0})
    assert list(tmp_path.iterdir()) == []
