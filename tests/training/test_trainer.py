"""The one trainer: data order, schedule, run names, and real fits on a 2-worker local Ray."""

from __future__ import annotations

import json
import os
import re
import time

import pytest
import torch
from tiny import tiny_trainer
from training_helpers import KilledOnce, NanAt, Regression

from unclip.datasets.storage import StorageLayout
from unclip.training.config import PriorConfig, TrainerConfig
from unclip.training.engine.fit_result import FitResult, run_name_for
from unclip.training.engine.optimization import ds_config, warmup_cosine
from unclip.training.engine.runlog import read_rows
from unclip.training.engine.train_loop import Ema
from unclip.training.engine.trainer import (
    TRAINER_STATE,
    check_resumable,
    fit,
    validate_trainer_config,
)


# --- pure parts ---------------------------------------------------------------------------
def test_warmup_then_cosine_decay():
    f = warmup_cosine(4, 20)
    assert [f(k) for k in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    values = [f(k) for k in range(4, 20)]
    assert values == sorted(values, reverse=True) and values[-1] < 0.05


def test_ds_config_follows_the_trainer_config():
    conf = ds_config(TrainerConfig(zero_stage=3, batch_size=5, grad_accum=2, grad_clip=0.5))
    assert conf["zero_optimization"]["stage"] == 3
    assert conf["train_micro_batch_size_per_gpu"] == 5 and conf["gradient_accumulation_steps"] == 2
    assert conf["gradient_clipping"] == 0.5 and conf["bf16"]["enabled"] is False
    assert "gradient_clipping" not in ds_config(TrainerConfig(grad_clip=0))


def test_run_name_is_a_content_hash_of_configs_data_and_seed():
    a = run_name_for("prior", PriorConfig(), data_version="v1", seed=0)
    assert a.startswith("prior-") and a == run_name_for(
        "prior", PriorConfig(), data_version="v1", seed=0
    )
    assert a != run_name_for("prior", PriorConfig(), data_version="v2", seed=0)
    assert a != run_name_for("prior", PriorConfig(), data_version="v1", seed=1)
    assert a != run_name_for("prior", PriorConfig(num_layers=2), data_version="v1", seed=0)


def test_bad_trainer_configs_fail_before_any_work():
    with pytest.raises(ValueError, match="bf16"):
        validate_trainer_config(TrainerConfig(precision="bf16"))
    with pytest.raises(ValueError, match="zero_stage"):
        validate_trainer_config(TrainerConfig(ema_decay=0.9, zero_stage=3))
    with pytest.raises(Exception, match=r"zero_stage\n.*0, 1, 2 or 3"):
        TrainerConfig(zero_stage=4)


def test_ema_follows_then_averages():
    model = torch.nn.Linear(2, 1)
    ema = Ema(model, decay=0.5, update_after=1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, 1)  # before update_after: a copy
    assert torch.all(ema.shadow["weight"] == 1.0)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model, 2)
    assert torch.allclose(ema.shadow["weight"], torch.full_like(model.weight, 2.0))
    # What a checkpoint holds and a resume loads back: host copies, not views of the average.
    saved = ema.state_dict()
    ema.update(model, 3)
    assert torch.allclose(saved["weight"], torch.full_like(model.weight, 2.0))
    ema.load_state_dict(saved)
    assert torch.equal(ema.shadow["weight"], saved["weight"])


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    ckpt = tmp_path / "run" / "checkpoint_000000004"
    ckpt.mkdir(parents=True)
    (ckpt / TRAINER_STATE).write_text(json.dumps({"step": 4, "task": {"model": "other"}}))
    with pytest.raises(ValueError, match="another model config"):
        check_resumable(str(tmp_path / "run"), Regression())
    check_resumable(str(tmp_path / "nothing-here"), Regression())


# --- fits on Ray ------------------------------------------------------------------------------
def checkpoints(run_dir: str) -> list[str]:
    return sorted(
        p
        for p in os.listdir(run_dir)
        if re.fullmatch(r"checkpoint_\d+", p) and os.path.isdir(os.path.join(run_dir, p))
    )


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> StorageLayout:
    return StorageLayout(str(tmp_path_factory.mktemp("trainer")))


@pytest.fixture(scope="module")
def zero1_run(ray_local, layout) -> tuple[FitResult, float]:
    t0 = time.perf_counter()
    result = fit(Regression(), tiny_trainer(), layout, "regression", "zero1")
    return result, time.perf_counter() - t0


def test_fit_trains_reports_checkpoints_and_exports(zero1_run, layout):
    result, _ = zero1_run
    assert not result.skipped and result.run_dir == layout.run_dir("regression", "zero1")
    rows = read_rows(os.path.join(result.run_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(2, 13, 2))
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert {"lr", "abs_err", "samples_per_s", "epoch"} <= set(rows[0])
    ckpts = checkpoints(result.run_dir)
    assert ckpts == ["checkpoint_000000006", "checkpoint_000000012"]
    state = json.loads(open(os.path.join(result.run_dir, ckpts[-1], TRAINER_STATE)).read())
    assert (
        state["step"] == 12
        and state["run_name"] == "zero1"
        and state["task"]["model"] == "regression"
    )
    assert os.path.isdir(os.path.join(result.run_dir, ckpts[-1], "deepspeed"))
    assert os.path.isfile(os.path.join(result.export_dir, "weights.pt"))
    assert os.path.isfile(os.path.join(result.run_dir, "loss.png"))
    assert result.metrics["step"] == 12 and result.metrics["eval_mse"] < rows[0]["loss"]
    weights = torch.load(os.path.join(result.export_dir, "weights.pt"), weights_only=True)
    assert weights["0.weight"].dtype == torch.float32


def test_fit_again_after_completion_does_no_training(zero1_run, layout):
    first, _ = zero1_run
    t0 = time.perf_counter()
    again = fit(Regression(), tiny_trainer(), layout, "regression", "zero1")
    assert again.skipped and again.metrics == first.metrics
    assert time.perf_counter() - t0 < 2.0


def test_a_killed_worker_resumes_mid_epoch_with_the_batch_that_came_next(
    zero1_run, layout, tmp_path
):
    """Rank 1 dies at micro-batch 11, after the step-8 checkpoint, in the middle of the second
    epoch; Ray restarts the group from its last checkpoint and the run goes on with the batch
    that came next, from the checkpoint's weights, optimizer and EMA state."""
    first, _ = zero1_run
    logs = tmp_path / "batches"
    logs.mkdir()
    task = KilledOnce(die_at=11, marker=str(tmp_path / "died"), log_dir=str(logs))
    cfg = tiny_trainer(max_failures=1, checkpoint_every=4, ema_decay=0.9)
    result = fit(task, cfg, layout, "regression", "killed")
    assert os.path.exists(tmp_path / "died")
    rows = read_rows(os.path.join(result.run_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(2, 13, 2))
    # Exact resume: the same batches and the same noise as the run that never died.
    reference = read_rows(os.path.join(first.run_dir, "metrics.jsonl"))
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in reference], rel=1e-5)
    # The EMA is not in the loss: only the exported (EMA) weights show whether it was restored.
    uninterrupted = fit(Regression(), tiny_trainer(ema_decay=0.9), layout, "regression", "ema")
    assert uninterrupted.metrics["eval_mse"] != pytest.approx(first.metrics["eval_mse"], rel=1e-3)
    torch.testing.assert_close(exported(result), exported(uninterrupted), rtol=1e-5, atol=1e-7)
    # A resume, not a restart: each rank's second life starts after a checkpoint (step 8, or
    # step 4 when Ray Train had not yet registered the step-8 report when the worker died),
    # and its batches are the ones an uninterrupted run draws (same rows, same order).
    for rank in (0, 1):
        lives = batch_logs(logs, rank)
        want = reference_batches(rank)
        assert len(lives) == 2
        resumed_at = 12 - len(lives[1])
        assert resumed_at in (4, 8) and lives[1] == want[resumed_at:12]
        assert lives[0] == want[: len(lives[0])] and len(lives[0]) >= 9
    assert result.metrics["stream_replaced"] == 0


def exported(result: FitResult) -> dict[str, torch.Tensor]:
    """The weights a fit exported."""
    return torch.load(os.path.join(result.export_dir, "weights.pt"), weights_only=True)


def batch_logs(directory, rank: int) -> list[list[tuple[int, ...]]]:
    """The rows of each batch ``rank`` drew, one list per life of the worker (in time order)."""
    lives = []
    for path in directory.glob(f"rank{rank}-*.txt"):
        lines = path.read_text().splitlines()
        lives.append((float(lines[0]), [tuple(int(x) for x in b.split()) for b in lines[1:]]))
    return [batches for _, batches in sorted(lives)]


def reference_batches(rank: int) -> list[tuple[int, ...]]:
    """The batches rank ``rank`` of an uninterrupted 2-worker run draws, from the stream itself."""
    from unclip.datasets.stream import RankStream, StreamPlan

    source = Regression().data()
    plan = StreamPlan.make(source.shards, rank, 2, 8, 16, seed=0)
    stream = RankStream(source, plan).batches(0)
    return [tuple(int(x) for x in next(stream)["row"]) for _ in range(12)]


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(ray_local, layout):
    cfg = tiny_trainer(zero_stage=2, ema_decay=0.9, checkpoint_every=5)
    with pytest.raises(FloatingPointError, match="at step 8"):
        fit(NanAt(nan_step=8), cfg, layout, "regression", "nan")
    run_dir = layout.run_dir("regression", "nan")
    assert checkpoints(run_dir) == ["checkpoint_000000005"]
    assert os.path.isfile(os.path.join(run_dir, "checkpoint_000000005", "ema.pt"))
    assert not os.path.exists(os.path.join(run_dir, "export"))
    assert [r["step"] for r in read_rows(os.path.join(run_dir, "metrics.jsonl"))] == [2, 4, 6]
    # the loss curve is redrawn at every checkpoint, so a run that stops early still has one
    assert os.path.getsize(os.path.join(run_dir, "loss.png")) > 0


def test_a_checkpoint_file_changed_or_planted_after_saving_is_refused(tmp_path):
    from unclip.training.engine.checkpoint_hashes import record_hashes, verify_hashes

    ckpt = tmp_path / "checkpoint_000000004"
    (ckpt / "deepspeed").mkdir(parents=True)
    (ckpt / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"weights of rank 0")
    (ckpt / TRAINER_STATE).write_text("{}")
    record_hashes(str(ckpt), rank=0)
    (ckpt / "deepspeed" / "zero_pp_rank_1_optim_states.pt").write_bytes(b"state of rank 1")
    with pytest.raises(ValueError, match="zero_pp_rank_1_optim_states.pt .* not written"):
        verify_hashes(str(ckpt))  # rank 1's record is not there yet: its file is unlisted
    other = tmp_path / "rank1"
    (other / "deepspeed").mkdir(parents=True)
    (other / "deepspeed" / "zero_pp_rank_1_optim_states.pt").write_bytes(b"state of rank 1")
    record_hashes(str(other), rank=1)
    (ckpt / "hashes" / "rank1.json").write_text((other / "hashes" / "rank1.json").read_text())
    verify_hashes(str(ckpt))  # every rank's files, as Ray Train merges them
    (ckpt / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"a pickle that runs code")
    with pytest.raises(ValueError, match="mp_rank_00_model_states.pt .* changed"):
        verify_hashes(str(ckpt))
    (ckpt / "deepspeed" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ValueError, match="missing"):
        verify_hashes(str(ckpt))
    with pytest.raises(ValueError, match="no hashes/ records"):
        verify_hashes(str(other / "deepspeed"))


def test_a_second_process_training_the_same_run_stops_naming_the_first(tmp_path):
    from unclip.datasets.lease import Lease, LeaseHeld

    layout = StorageLayout(str(tmp_path))
    first = Lease(layout.lease("runs", "regression", "busy"), what="training busy elsewhere")
    with first.hold(), pytest.raises(LeaseHeld, match="training busy elsewhere"):
        fit(Regression(), tiny_trainer(), layout, "regression", "busy")
    assert not os.path.exists(layout.run_dir("regression", "busy"))


def test_a_resume_may_change_the_world_size_only_at_an_epoch_boundary(tmp_path):
    from unclip.datasets.stream import StreamPlan
    from unclip.training.engine.stream_position import StreamPosition

    source = Regression().data()  # 96 rows
    two = StreamPlan.make(source.shards, 0, 2, 8, 16, seed=0)  # 6 steps an epoch
    one = StreamPlan.make(source.shards, 0, 1, 8, 16, seed=0)  # 12 steps an epoch
    at_boundary = StreamPosition(two, 0, 0).state(12, source)  # after 2 epochs of world 2
    assert (at_boundary["epoch"], at_boundary["micro_in_epoch"]) == (2, 0)
    resumed = StreamPosition.resumed(at_boundary, one, 12, world=1)
    assert one.locate(resumed.stream_step(12)) == (2, 0, 0)  # epoch 2 from its first block
    assert one.locate(resumed.stream_step(13)) == (2, 0, 8)
    same = StreamPosition.resumed(StreamPosition(two, 0, 0).state(9, source), two, 9, world=2)
    assert two.locate(same.stream_step(9)) == (1, 1, 8)  # mid-epoch, same world: exact
    mid = StreamPosition(two, 0, 0).state(9, source)
    with pytest.raises(ValueError, match="written by 2 workers in the middle of an epoch.*with 1"):
        StreamPosition.resumed(mid, one, 9, world=1)
    # the driver refuses it before any worker starts, naming the checkpoint
    ckpt = tmp_path / "run" / "checkpoint_000000009"
    ckpt.mkdir(parents=True)
    state = {"step": 9, "task": Regression().describe(), "stream": mid}
    (ckpt / TRAINER_STATE).write_text(json.dumps(state))
    with pytest.raises(ValueError, match="checkpoint_000000009: .*2 workers.*with 1"):
        check_resumable(str(tmp_path / "run"), Regression(), source, tiny_trainer(num_workers=1))
    check_resumable(str(tmp_path / "run"), Regression(), source, tiny_trainer(num_workers=2))
    other = Regression(n=80).data()
    with pytest.raises(ValueError, match="streamed other data"):
        check_resumable(str(tmp_path / "run"), Regression(), other, tiny_trainer())
