"""What a resume loads and whether it may: the checkpoint's files, their hashes, the driver's checks.

No Ray and no DeepSpeed (seconds a run; with ``test_stream_position.py`` and ``test_ema.py``
the mutation session's test command): the engine is ``resume_fakes.TorchEngine``, a real module,
optimizer and LR schedule saved and loaded the way DeepSpeed's engine is called. The fits in
``test_trainer.py`` check the same code under Ray.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
from typing import Any

import fsspec
import pytest
import torch
from resume_fakes import Described, Rows, TorchEngine
from tiny import tiny_trainer

from unclip.datasets.stream import StreamPlan
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
from unclip.training.engine.stream_position import StreamPosition


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


def test_any_change_to_a_listed_file_is_refused(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"weights")
    record_hashes(str(tmp_path), 0)
    saved = json.loads((tmp_path / "hashes" / "rank0.json").read_text())["model.pt"]
    changes = [b"weights %d" % i for i in range(8)]
    # digests that sort before and after the saved one: any difference is refused, not an order
    assert {hashlib.sha256(c).hexdigest() > saved for c in changes} == {True, False}
    for content in changes:
        (tmp_path / "model.pt").write_bytes(content)
        with pytest.raises(ValueError, match="model.pt in .* changed since it was saved"):
            verify_hashes(str(tmp_path))


class RunsCode:
    """A pickle that runs code when unpickled (what ``weights_only`` refuses)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.makedirs, (self.marker,))


def test_an_ema_file_is_loaded_as_tensors_only_even_when_its_hashes_match(tmp_path):
    engine = TorchEngine(seed=0)
    ema = Ema(engine.module, decay=0.5, update_after=0)
    write_checkpoint(str(tmp_path), engine, ema, 2, 0, IDENT)
    torch.save({"0.weight": RunsCode(str(tmp_path / "ran"))}, tmp_path / EMA_FILE)
    record_hashes(str(tmp_path), 0)  # whoever can rewrite the hash records too
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(str(tmp_path), TorchEngine(seed=1), ema, "c")
    assert not (tmp_path / "ran").exists()


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
