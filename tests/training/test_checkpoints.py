"""What a resume loads and whether it may: checkpoint files, their hashes, the stream's position, the EMA.

No Ray and no DeepSpeed (seconds a run, the mutation session's test command): the engine is
:class:`TorchEngine`, a real module, optimizer and LR schedule saved and loaded the way
DeepSpeed's engine is called. The fits in ``test_trainer.py`` check the same code under Ray.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import fsspec
import pytest
import torch
from tiny import tiny_trainer

from unclip.datasets.stream import ShardSource, StreamPlan, StreamShard
from unclip.training.engine.checkpoint_hashes import record_hashes, verify_hashes
from unclip.training.engine.checkpoints import (
    EMA_FILE,
    TRAINER_STATE,
    check_resumable,
    latest_checkpoint_state,
    load_checkpoint,
    write_checkpoint,
)
from unclip.training.engine.ema import Ema
from unclip.training.engine.stream_position import StreamPosition, stream_totals


class Rows(ShardSource):
    """A source known by its shard counts alone (what plans and identities are made of)."""

    def __init__(self, n: int = 96, shard_size: int = 20) -> None:
        sizes = [min(shard_size, n - i) for i in range(0, n, shard_size)]
        self.shards = [StreamShard(f"rows/{i:05d}", c) for i, c in enumerate(sizes)]

    def read(self, shard: int, start: int, stop: int, stats: Any) -> list[Any]:
        raise AssertionError("nothing here reads samples")

    def collate(self, samples: list[Any]) -> dict[str, Any]:
        raise AssertionError("nothing here reads samples")


class Described:
    """A task as the driver's check sees it: its identity."""

    def __init__(self, **identity: Any) -> None:
        self.identity = {"model": "regression", "n": 96, **identity}

    def describe(self) -> dict[str, Any]:
        return self.identity


class TorchEngine:
    """DeepSpeed's engine as checkpoints call it: ``save_checkpoint`` / ``load_checkpoint`` of
    a module with its AdamW state and LR schedule under ``{dir}/{tag}/``; ``(None, None)`` where
    nothing was saved, as DeepSpeed answers."""

    FILE = "mp_rank_00_model_states.pt"

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.module = torch.nn.Sequential(
            torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)
        )
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=0.1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda k: 1 / (1 + k))
        self.loads: list[str] = []

    def train(self, steps: int, ema: Ema | None = None, first: int = 1) -> None:
        for s in range(first, first + steps):
            x = torch.linspace(-1, 1, 24).reshape(8, 3) * s
            loss = (self.module(x) - x.sum(1, keepdim=True)).pow(2).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            if ema is not None:
                ema.update(self.module, s)

    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        os.makedirs(os.path.join(save_dir, tag))
        state = {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        torch.save(state, os.path.join(save_dir, tag, self.FILE))

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str | None, Any]:
        path = os.path.join(load_dir, tag, self.FILE)
        self.loads.append(path)
        if not os.path.isfile(path):
            return None, None
        state = torch.load(path, weights_only=True)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return path, {}


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def state_file(directory, state: dict[str, Any]) -> None:
    directory.mkdir(parents=True)
    (directory / TRAINER_STATE).write_text(json.dumps(state))


IDENT = {"run_name": "r", "task": {"model": "regression", "n": 96}, "stream": {"epoch": 1}}


# --- a worker writes its part and loads a checkpoint back -----------------------------------
def test_a_resume_loads_the_checkpoints_weights_optimizer_schedule_and_ema(tmp_path, caplog):
    trained = TorchEngine(seed=0)
    ema = Ema(trained.module, decay=0.5, update_after=1)
    trained.train(4, ema)
    write_checkpoint(str(tmp_path), trained, ema, 4, 0, IDENT)
    state = json.loads((tmp_path / TRAINER_STATE).read_text())
    assert state == {**IDENT, "step": 4, "ema": True}
    assert set(os.listdir(tmp_path / "hashes")) == {"rank0.json"}

    fresh = TorchEngine(seed=1)
    fresh_ema = Ema(fresh.module, decay=0.5, update_after=1)
    assert not torch.equal(fresh.module[0].weight, trained.module[0].weight)
    with caplog.at_level(logging.INFO, logger="unclip.training.engine.checkpoints"):
        step, loaded = load_checkpoint(str(tmp_path), fresh, fresh_ema, "runs/r/checkpoint_4")
    assert type(step) is int and step == 4 and loaded == state
    assert "resumed at step 4 from runs/r/checkpoint_4" in caplog.text
    assert_same(weights(fresh.module), weights(trained.module))
    assert_same(fresh_ema.shadow, ema.shadow)
    # the optimizer's moments and the LR schedule came back too: the next steps are the same
    assert fresh.scheduler.get_last_lr() == trained.scheduler.get_last_lr()
    trained.train(2, ema, first=5)
    fresh.train(2, fresh_ema, first=5)
    assert_same(weights(fresh.module), weights(trained.module))
    assert_same(fresh_ema.shadow, ema.shadow)


def test_rank_0_alone_writes_the_trainer_state_and_the_ema_and_every_rank_its_hashes(tmp_path):
    engine = TorchEngine(seed=0)
    ema = Ema(engine.module, decay=0.9, update_after=0)
    write_checkpoint(str(tmp_path / "rank1"), engine, ema, 6, 1, IDENT)
    assert sorted(os.listdir(tmp_path / "rank1")) == ["deepspeed", "hashes"]
    assert os.listdir(tmp_path / "rank1" / "hashes") == ["rank1.json"]
    listed = json.loads((tmp_path / "rank1" / "hashes" / "rank1.json").read_text())
    assert list(listed) == [os.path.join("deepspeed", TorchEngine.FILE)]
    # without an EMA: the state says so, and there is no ema.pt to load
    write_checkpoint(str(tmp_path / "rank0"), engine, None, 6, 0, IDENT)
    assert json.loads((tmp_path / "rank0" / TRAINER_STATE).read_text())["ema"] is False
    assert not (tmp_path / "rank0" / EMA_FILE).exists()
    before = {k: v.clone() for k, v in ema.shadow.items()}
    fresh = TorchEngine(seed=1)
    assert load_checkpoint(str(tmp_path / "rank0"), fresh, ema, "c")[0] == 6
    assert_same(ema.shadow, before)  # no ema.pt: the EMA starts from the weights it was given
    assert load_checkpoint(str(tmp_path / "rank0"), TorchEngine(seed=2), None, "c")[0] == 6
    assert_same(weights(fresh.module), weights(engine.module))


def test_a_checkpoint_is_verified_before_the_engine_loads_anything(tmp_path):
    engine = TorchEngine(seed=0)
    write_checkpoint(str(tmp_path), engine, None, 2, 0, IDENT)
    (tmp_path / "deepspeed" / TorchEngine.FILE).write_bytes(b"a pickle that runs code")
    fresh = TorchEngine(seed=1)
    with pytest.raises(ValueError, match=f"{TorchEngine.FILE} in .* changed since it was saved"):
        load_checkpoint(str(tmp_path), fresh, None, "c")
    assert fresh.loads == []


def test_a_checkpoint_deepspeed_finds_nothing_in_is_an_error_naming_it(tmp_path):
    engine = TorchEngine(seed=0)
    write_checkpoint(str(tmp_path), engine, None, 2, 0, IDENT)
    os.rename(tmp_path / "deepspeed", tmp_path / "elsewhere")
    record_hashes(str(tmp_path), 0)  # the files as they are now, so the hashes pass
    with pytest.raises(RuntimeError, match="DeepSpeed found no checkpoint in runs/r/checkpoint_2"):
        load_checkpoint(str(tmp_path), TorchEngine(seed=1), None, "runs/r/checkpoint_2")


def test_a_checkpoint_file_changed_or_planted_after_saving_is_refused(tmp_path):
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


# --- the driver: the newest checkpoint, and whether it may be resumed -----------------------
def test_the_newest_checkpoint_with_a_trainer_state_is_the_one_resumed(tmp_path):
    run = tmp_path / "run"
    assert latest_checkpoint_state(str(run)) is None  # no run folder yet
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    assert latest_checkpoint_state(str(run)) is None  # a run folder without checkpoints
    state_file(run / "checkpoint_000000009", {"step": 9})
    state_file(run / "checkpoint_000000010", {"step": 10})
    (run / "checkpoint_000000012").mkdir()  # no trainer state: not a checkpoint to resume
    state_file(run / "export", {"step": 99})  # not a checkpoint folder
    path, state = latest_checkpoint_state(str(run))
    assert path.endswith("/run/checkpoint_000000010") and state == {"step": 10}
    remote = "memory://checkpoints-test/run"  # remote storage: paths without a file system
    for step in (3, 4):
        with fsspec.open(f"{remote}/checkpoint_{step:09d}/{TRAINER_STATE}", "w") as f:
            json.dump({"step": step}, f)
    path, state = latest_checkpoint_state(f"{remote}/")
    assert path.rstrip("/").endswith("run/checkpoint_000000004") and state == {"step": 4}


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    ckpt = tmp_path / "run" / "checkpoint_000000004"
    ckpt.mkdir(parents=True)
    (ckpt / TRAINER_STATE).write_text(json.dumps({"step": 4, "task": {"model": "other"}}))
    with pytest.raises(ValueError, match="another model config"):
        check_resumable(str(tmp_path / "run"), Described())
    check_resumable(str(tmp_path / "nothing-here"), Described())


def test_a_checkpoint_of_the_same_task_resumes_whatever_the_driver_knows(tmp_path):
    run = tmp_path / "run"
    mid = StreamPosition(StreamPlan.make(Rows().shards, 0, 2, 8, 16, seed=0), 0, 0).state(9, Rows())
    task = Described(init_from=tmp_path / "start")  # not JSON: compared as the checkpoint wrote it
    state_file(
        run / "checkpoint_000000009",
        {"step": 9, "task": json.loads(json.dumps(task.describe(), default=str)), "stream": mid},
    )
    check_resumable(str(run), task)  # no source: the data is not checked
    check_resumable(str(run), task, Rows())  # no config: the world is not checked
    with pytest.raises(ValueError, match=f"checkpoint {run}/checkpoint_000000009 was written"):
        check_resumable(str(run), Described(n=80), Rows(), tiny_trainer(num_workers=2))
    state_file(run / "checkpoint_000000010", {"step": 10, "task": Described().describe()})
    check_resumable(str(run), Described(), Rows(n=80), tiny_trainer(num_workers=1))  # no stream
    with pytest.raises(ValueError, match=f"delete {re.escape(str(run))}$"):
        check_resumable(str(run), Described(n=80))


def test_a_resume_may_change_the_world_size_only_at_an_epoch_boundary(tmp_path):
    source = Rows()  # 96 rows
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
    state = {"step": 9, "task": Described().describe(), "stream": mid}
    (ckpt / TRAINER_STATE).write_text(json.dumps(state))
    with pytest.raises(ValueError, match="checkpoint_000000009: .*2 workers.*with 1"):
        check_resumable(str(tmp_path / "run"), Described(), source, tiny_trainer(num_workers=1))
    check_resumable(str(tmp_path / "run"), Described(), source, tiny_trainer(num_workers=2))
    other = Rows(n=80)
    with pytest.raises(ValueError, match="streamed other data"):
        check_resumable(str(tmp_path / "run"), Described(), other, tiny_trainer())


# --- the stream's position in a checkpoint ---------------------------------------------------
def test_a_fresh_run_streams_from_the_start_and_a_checkpoint_records_where_it_stands():
    source = Rows()
    two = StreamPlan.make(source.shards, 1, 2, 8, 16, seed=0)  # 6 steps an epoch
    for saved in (None, {}):  # a fresh run, or a checkpoint from before stream positions
        fresh = StreamPosition.resumed(saved, two, 7, world=2)
        assert (fresh.origin_step, fresh.origin_epoch, fresh.stream_step(7)) == (0, 0, 7)
    assert StreamPosition(two, 0, 0).state(8, source) == {
        "world": 2,
        "epoch": 1,
        "micro_in_epoch": 2,
        "steps_per_epoch": 6,
        "origin_step": 0,
        "origin_epoch": 0,
        "source": {"shards": 5, "samples": 96},
    }


def test_a_world_change_starts_a_new_origin_that_later_resumes_keep():
    source = Rows()
    two = StreamPlan.make(source.shards, 0, 2, 8, 16, seed=0)  # 6 steps an epoch
    one = StreamPlan.make(source.shards, 0, 1, 8, 16, seed=0)  # 12 steps an epoch
    # 2 epochs of world 2 (micro-steps 0-11), then world 1 from micro-step 12 at epoch 2
    moved = StreamPosition.resumed(StreamPosition(two, 0, 0).state(12, source), one, 12, world=1)
    assert (moved.origin_step, moved.origin_epoch) == (12, 2)
    assert moved.stream_step(15) == 2 * 12 + 3
    later = moved.state(15, source)
    assert (later["world"], later["epoch"], later["micro_in_epoch"]) == (1, 2, 3)
    assert (later["origin_step"], later["origin_epoch"], later["steps_per_epoch"]) == (12, 2, 12)
    again = StreamPosition.resumed(later, one, 15, world=1)  # same world: the origin is kept
    assert (again.origin_step, again.origin_epoch, again.stream_step(15)) == (12, 2, 27)
    # a world change at a later epoch boundary: the new origin is that epoch, at that step
    back = StreamPosition.resumed(moved.state(24, source), two, 24, world=2)
    assert (back.origin_step, back.origin_epoch, back.stream_step(25)) == (24, 3, 19)


def test_the_stream_totals_sum_the_counts_and_keep_the_worst_rank(tmp_path, caplog):
    import resource
    from types import SimpleNamespace

    import torch.distributed as dist

    from unclip.datasets.stream import StreamStats

    stats = StreamStats(errors=["shard 3: bad jpeg"], bytes_read=4096, samples=40, replaced=2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        with caplog.at_level(logging.WARNING, logger="unclip.training.engine.stream_position"):
            totals = stream_totals(SimpleNamespace(stats=stats), torch.device("cpu"), 1.5)
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        quiet = stream_totals(SimpleNamespace(stats=StreamStats()), torch.device("cpu"), 0.0)
    finally:
        dist.destroy_process_group()
    assert totals == {
        "stream_samples": 40.0,
        "stream_replaced": 2.0,
        "stream_bytes_read_max_rank": 4096.0,
        "first_step_s_max_rank": 1.5,
        "peak_rss_mb_max_rank": pytest.approx(rss_mb, rel=0.05),
    }
    assert "stream: 2 samples replaced, e.g. ['shard 3: bad jpeg']" in caplog.text
    assert caplog.text.count("samples replaced") == 1  # none for a stream without errors
    assert quiet["stream_samples"] == 0.0 and quiet["peak_rss_mb_max_rank"] > 50


# --- the EMA a checkpoint holds -----------------------------------------------------------------
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


def test_ema_averages_trainable_weights_in_fp32_whatever_their_dtype():
    model = torch.nn.Linear(2, 1).to(torch.bfloat16)
    model.bias.requires_grad_(False)  # frozen: nothing to average
    ema = Ema(model, decay=0.75, update_after=0)
    assert list(ema.shadow) == ["weight"] and ema.shadow["weight"].dtype == torch.float32
    start = model.weight.detach().float().clone()
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, 1)
    torch.testing.assert_close(ema.shadow["weight"], 0.75 * start + 0.25)
    saved = ema.state_dict()
    assert saved["weight"].dtype == torch.float32 and saved["weight"].device.type == "cpu"
