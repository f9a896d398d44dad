"""The one trainer: data order, schedule, run names, and real fits on a 2-worker local Ray."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from tiny import tiny_trainer
from training_helpers import KilledOnce, NanAt, Regression, make_prior_task

from unclip.datasets.storage import StorageLayout
from unclip.training.config import PriorConfig, TrainerConfig
from unclip.training.engine.checkpoints import TRAINER_STATE
from unclip.training.engine.fit_result import FitResult, run_name_for
from unclip.training.engine.optimization import ds_config, warmup_cosine
from unclip.training.engine.runlog import read_rows
from unclip.training.engine.trainer import fit, validate_trainer_config, worker_config


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


def python_with_deepspeed_on_cpu(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (DeepSpeed's imports and op cache are per process);
    return the finished process, after checking it exited cleanly."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_deepspeeds_inference_only_all_reduce_op_is_neither_built_nor_loaded():
    """DeepSpeed's communication backend would JIT-build its CPU shared-memory all-reduce (about
    30 s once per environment), which only inference all-reduces use."""
    done = python_with_deepspeed_on_cpu(
        "import deepspeed\n"
        "from deepspeed.comm.torch import build_shm_op\n"
        "from unclip.training.engine.optimization import skip_unused_ops\n"
        "skip_unused_ops(deepspeed)\n"
        "print('op', build_shm_op())\n"
    )
    assert done.stdout.strip().splitlines()[-1] == "op None"
    assert "built successfully" not in done.stdout + done.stderr


def test_deepspeed_is_imported_without_mlflow_which_stays_importable():
    """DeepSpeed's autotuner imports mlflow (1-2 s of each worker's start) for nothing."""
    done = python_with_deepspeed_on_cpu(
        "import sys\n"
        "from unclip.training.engine.optimization import import_deepspeed\n"
        "ds = import_deepspeed()\n"
        "print('ds', ds.__name__, 'mlflow' in sys.modules)\n"
        "import mlflow\n"
        "print('mlflow', mlflow.__name__)\n"
    )
    assert done.stdout.strip().splitlines()[-2:] == ["ds deepspeed False", "mlflow mlflow"]


def test_ray_trains_controller_unpickles_the_config_without_importing_the_model(tmp_path):
    """Ray Train gives train_loop_config to its controller too: there it must stay bytes, so the
    controller, which starts first in every run, does not import torch's model stack."""
    import ray.cloudpickle

    config = {"task": make_prior_task(), "cfg": TrainerConfig(), "run_name": "prior-x"}
    sent = tmp_path / "train_loop_config.pkl"
    sent.write_bytes(ray.cloudpickle.dumps(worker_config(config, None)))
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import pickle, sys\n"
            f"config = pickle.loads(open({str(sent)!r}, 'rb').read())\n"
            "print(sorted(config), sorted(m for m in sys.modules if m.split('.')[0] in "
            "('diffusers', 'torch', 'open_clip') or m.startswith('unclip.training.models')))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["['payload',", "'progress_relay']", "[]"]
    # and the worker gets the config back whole
    payload = worker_config(config, None)["payload"]
    back = ray.cloudpickle.loads(payload)
    assert set(back) == set(config) and back["cfg"] == config["cfg"]
    assert back["task"].describe() == config["task"].describe()


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


def test_a_second_process_training_the_same_run_stops_naming_the_first(tmp_path):
    from unclip.datasets.lease import Lease, LeaseHeld

    layout = StorageLayout(str(tmp_path))
    first = Lease(layout.lease("runs", "regression", "busy"), what="training busy elsewhere")
    with first.hold(), pytest.raises(LeaseHeld, match="training busy elsewhere"):
        fit(Regression(), tiny_trainer(), layout, "regression", "busy")
    assert not os.path.exists(layout.run_dir("regression", "busy"))
