"""What a checkpoint folder holds, which one a resume loads, and whether it may load it.

A checkpoint is Ray Train's ``checkpoint_{step:09d}/`` folder of a run: every rank's DeepSpeed
shard under ``deepspeed/``, rank 0's ``trainer_state.json`` (the step, the task's identity, the
stream's position) and ``ema.pt``, and each rank's file hashes under ``hashes/``. The driver
refuses a foreign checkpoint before any worker starts (:func:`check_resumable`); a worker writes
its part (:func:`write_checkpoint`) and loads one back (:func:`load_checkpoint`). Ray Train's
own calls stay in :mod:`~unclip.training.engine.train_loop`, so this module needs no Ray.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

import torch
from fsspec.core import url_to_fs

from unclip.datasets.stream import ShardSource, check_world_change

from .checkpoint_hashes import record_hashes, verify_hashes
from .ema import Ema

if TYPE_CHECKING:
    from ..trainer_config import TrainerConfig
    from .trainer import TrainTask

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"  # rank 0's file in every checkpoint
DS_TAG = "deepspeed"  # DeepSpeed's sub-folder inside each checkpoint
EMA_FILE = "ema.pt"


# --- the driver: which checkpoint, and may it be resumed ------------------------------------
def latest_checkpoint_state(run_dir: str) -> tuple[str, dict[str, Any]] | None:
    """(path, trainer state) of the newest checkpoint under ``run_dir``, or None."""
    fs, root = url_to_fs(run_dir)
    if not fs.exists(root):
        return None
    found = []
    for path in fs.ls(root, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("checkpoint_") and fs.exists(f"{path}/{TRAINER_STATE}"):
            found.append(path)
    if not found:
        return None
    path = max(found)  # checkpoint_{step:09d}: the name orders them
    with fs.open(f"{path}/{TRAINER_STATE}", "r") as f:
        return path, json.load(f)


def check_resumable(
    run_dir: str,
    task: TrainTask,
    source: ShardSource | None = None,
    cfg: TrainerConfig | None = None,
) -> None:
    """Refuse to resume a checkpoint of another model, other data, or a half-read epoch's world."""
    latest = latest_checkpoint_state(run_dir)
    if latest is None:
        return
    path, state = latest
    want = json.loads(json.dumps(task.describe(), sort_keys=True, default=str))
    if state.get("task") != want:
        raise ValueError(
            f"checkpoint {path} was written for another model config or data set "
            f"({state.get('task')!r}, now {want!r}); use another run name or delete {run_dir}"
        )
    stream = state.get("stream")
    if stream is None or source is None:
        return
    now = json.loads(json.dumps(source.identity(), sort_keys=True, default=str))
    if stream.get("source") != now:
        raise ValueError(
            f"checkpoint {path} streamed other data ({stream.get('source')!r}, now {now!r}); "
            f"use another run name or delete {run_dir}"
        )
    if cfg is not None:
        try:
            check_world_change(int(stream["world"]), cfg.num_workers, int(stream["micro_in_epoch"]))
        except ValueError as e:
            raise ValueError(f"checkpoint {path}: {e}") from None


# --- a worker: its part of a checkpoint, and loading one back -------------------------------
def write_checkpoint(
    directory: str, engine: Any, ema: Ema | None, step: int, rank: int, ident: dict[str, Any]
) -> None:
    """This rank's part of the checkpoint of ``step`` in the local ``directory``, hashes last.

    Every rank saves its DeepSpeed shard; rank 0 adds the trainer state (``ident``, the step,
    whether an EMA is kept) and the EMA's weights.
    """
    engine.save_checkpoint(directory, tag=DS_TAG)
    if rank == 0:
        with open(os.path.join(directory, TRAINER_STATE), "w") as f:
            json.dump({**ident, "step": step, "ema": ema is not None}, f, indent=2)
        if ema is not None:
            torch.save(ema.state_dict(), os.path.join(directory, EMA_FILE))
    record_hashes(directory, rank)


def load_checkpoint(
    directory: str, engine: Any, ema: Ema | None, where: str
) -> tuple[int, dict[str, Any]]:
    """Load the checkpoint in the local ``directory`` into the engine and EMA: (step, state).

    Its files are checked against their hashes before DeepSpeed unpickles any; ``where`` names
    the checkpoint (its path in the run) in the errors and the log.
    """
    verify_hashes(directory)
    with open(os.path.join(directory, TRAINER_STATE)) as f:
        state = json.load(f)
    load_path, _ = engine.load_checkpoint(directory, tag=DS_TAG)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {where}")
    if ema is not None:
        ema_path = os.path.join(directory, EMA_FILE)
        if os.path.exists(ema_path):
            ema.load_state_dict(torch.load(ema_path, weights_only=True))
    log.info("resumed at step %d from %s", state["step"], where)
    return int(state["step"]), state
