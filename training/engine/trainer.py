"""The one trainer every model uses: a model plugs in as a :class:`TrainTask`, never by a copy of the loop.

:func:`fit` runs Ray Train's ``TorchTrainer``; each worker runs
:func:`unclip.training.engine.train_loop.train_loop` (DeepSpeed ZeRO, LR schedule, checkpoints reported
to Ray Train, exact resume, export). This module is the driver side: run names, the skip of a
finished run, the Ray Train configuration and the result.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import torch
from fsspec.core import url_to_fs

from unclip.datasets.lease import Lease
from unclip.datasets.progress_records import bars_drawn
from unclip.datasets.ray_runtime import ensure_started
from unclip.datasets.storage import StorageLayout
from unclip.datasets.stream import Columns, ShardSource

from ..trainer_config import TrainerConfig
from .checkpoints import check_resumable
from .fit_result import EXPORT_DIRNAME, FitResult, completed_fit, finished_run
from .progress import ProgressRelay
from .trackers import check_trackers

log = logging.getLogger(__name__)

PAYLOAD_KEY = "payload"  # train_loop_config's pickled part (see worker_config)


class TrainTask(ABC):
    """What a model supplies to the trainer; the trainer owns everything else.

    A task is pickled to every Ray Train worker, so it holds configs and paths, never data:
    the trainer streams micro-batches from the task's :meth:`data` source, each rank reading
    only its own part (:mod:`unclip.datasets.stream`), and hands each to :meth:`batch`.
    """

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able identity of model and data; a checkpoint of another identity is refused."""

    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """A fresh single-device model in fp32 (the trainer seeds torch before calling it)."""

    @abstractmethod
    def data(self) -> ShardSource:
        """The training data as a shard source; called once, on the driver.

        Its per-shard counts fix every rank's share and steps per epoch, so they must come
        from the manifest or shard metadata, never from reading samples.
        """

    def setup(self, rank: int, world: int) -> None:
        """Per-worker preparation before the first batch (load a frozen encoder, say)."""
        return None

    @abstractmethod
    def batch(self, columns: Columns) -> Any:
        """Tensors of one micro-batch from the source's columns (a dict / tuple of tensors)."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss of one micro-batch and extra metrics (the same keys at every step)."""

    @abstractmethod
    def export(self, model: torch.nn.Module, directory: str) -> None:
        """Write inference weights of ``model`` (fp32, on CPU) into the local ``directory``."""

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Metrics of the exported model, computed once on rank 0 after training."""
        return {}


def fit(
    task: TrainTask, cfg: TrainerConfig, layout: StorageLayout, model_kind: str, run_name: str
) -> FitResult:
    """Train ``task`` under Ray Train + DeepSpeed; resume the run's last checkpoint; export once."""
    validate_trainer_config(cfg)
    done = finished_run(layout, model_kind, run_name)
    if done is not None:
        return done
    run_dir = layout.run_dir(model_kind, run_name)
    export_dir = f"{run_dir}/{EXPORT_DIRNAME}"
    # One process trains a run at a time: a second one (another CLI, the UI) stops naming the
    # first instead of writing the same checkpoint names.
    with Lease(layout.lease("runs", model_kind, run_name), what=f"training {run_name}").hold():
        return _fit_held(task, cfg, layout, model_kind, run_name, run_dir, export_dir)


def _fit_held(
    task: TrainTask,
    cfg: TrainerConfig,
    layout: StorageLayout,
    model_kind: str,
    run_name: str,
    run_dir: str,
    export_dir: str,
) -> FitResult:
    done = completed_fit(export_dir)  # finished while this process waited for the lease
    if done is not None:
        return FitResult(run_name, run_dir, export_dir, done.get("metrics", {}), skipped=True)
    source = task.data()
    check_resumable(run_dir, task, source, cfg)

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .train_loop import train_loop_from_payload

    ensure_started()  # RAY_ADDRESS, when set, picks the cluster
    relay = ProgressRelay() if bars_drawn() else None  # a terminal's bar instead of lines
    storage_path, storage_fs = ray_storage(layout.runs_dir(model_kind))
    trainer = TorchTrainer(
        train_loop_from_payload,
        train_loop_config=worker_config(
            {
                "task": task,
                "source": source,
                "cfg": cfg,
                "layout": layout,
                "model_kind": model_kind,
                "run_name": run_name,
            },
            relay.queue if relay is not None else None,
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={
                "CPU": cfg.cpus_per_worker,
                **({"GPU": 1} if cfg.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_last),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    finally:
        if relay is not None:
            relay.close()
    outcome = result.return_value or {}
    if "nonfinite_step" in outcome:
        raise FloatingPointError(
            f"run {run_name}: the loss became {outcome['nonfinite_loss']} at step "
            f"{outcome['nonfinite_step']}; training stopped before that step's update, "
            f"the last good checkpoint is kept in {run_dir}"
        )
    done = completed_fit(export_dir)
    if done is None:
        raise RuntimeError(f"run {run_name} ended without an export in {export_dir}")
    return FitResult(run_name, run_dir, export_dir, done.get("metrics", {}), skipped=False)


def worker_config(config: dict[str, Any], progress_relay: Any) -> dict[str, Any]:
    """Ray Train's ``train_loop_config``: ``config`` pickled into bytes, and the progress queue.

    Ray Train hands this dict to its controller actor as well as to the workers. As bytes, the
    task (a model's classes: torch, diffusers, open_clip) is unpickled only where it trains, and
    the controller, which every run starts first, skips those imports (about 5 s of its start
    on 2 CPUs; a 3-step prior fit took 25.0 s instead of 27.3, mean of three). The queue, an
    actor handle, stays outside for Ray to serialize.
    """
    import ray.cloudpickle  # honours register_pickle_by_value, as Ray's own pickling does

    return {PAYLOAD_KEY: ray.cloudpickle.dumps(config), "progress_relay": progress_relay}


def validate_trainer_config(cfg: TrainerConfig) -> None:
    """Errors a run would otherwise hit minutes later, on a worker."""
    if cfg.precision == "bf16" and not cfg.use_gpu:
        raise ValueError(
            "trainer.precision: 'bf16' needs CUDA; set trainer.use_gpu: true or use 'fp32'"
        )
    check_trackers(cfg.report_to)
    if cfg.ema_decay > 0 and cfg.zero_stage == 3:
        raise ValueError(
            "trainer.ema_decay: EMA weights need zero_stage <= 2 (ZeRO-3 shards the weights)"
        )


def ray_storage(runs_dir: str) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for Ray Train's RunConfig."""
    if "://" not in runs_dir or runs_dir.startswith("file://"):
        return url_to_fs(runs_dir)[1], None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = url_to_fs(runs_dir)
    return path, PyFileSystem(FSSpecHandler(fs))
