"""What every Ray Train worker runs: DeepSpeed engine, the data stream, checkpoints, resume, export.

Exact resume rests on two rules: the micro-batch of micro-step ``k`` is a pure function of
``(seed, k, rank)`` and the shard counts (:class:`~unclip.datasets.stream.StreamPlan`), and so
is torch's RNG state when its loss is computed (:func:`seed_micro_step`). A run restored from
the checkpoint of step ``s`` therefore sees the same batches and the same noise as the run that
wrote it; its stream starts at the block holding ``s`` and never re-reads earlier ones.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import torch

from unclip.datasets.storage import StorageLayout
from unclip.datasets.stream import RankStream, ShardSource, StreamPlan

from ..trainer_config import TrainerConfig
from .artifacts import publish_dir
from .checkpoints import load_checkpoint, write_checkpoint
from .ema import Ema
from .fit_result import EXPORT_DIRNAME, EXPORT_MARKER
from .optimization import (
    ds_config,
    import_deepspeed,
    make_optimizer,
    skip_unused_ops,
    warmup_cosine,
)
from .progress import TrainProgress, ensure_progress_handler
from .runlog import RunLog
from .stream_position import StreamPosition, stream_totals
from .trackers import Trackers
from .trainer import PAYLOAD_KEY, TrainTask

log = logging.getLogger(__name__)


# --- pure parts: seeds, devices ------------------------------------------------------------------
def seed_micro_step(seed: int, micro_step: int, rank: int) -> None:
    """Seed torch (CPU and CUDA) from (seed, micro-step, rank): the noise a loss draws is replayable."""
    state = np.random.SeedSequence([seed % 2**32, micro_step, rank]).generate_state(1)[0]
    torch.manual_seed(int(state))


def to_device(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move a batch (tensor, dict, list, tuple) to ``device``; floating tensors to ``dtype``."""
    if isinstance(batch, torch.Tensor):
        if batch.is_floating_point():
            return batch.to(device=device, dtype=dtype, non_blocking=True)
        return batch.to(device=device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device, dtype) for v in batch)
    return batch


# --- the worker ----------------------------------------------------------------------------
def train_loop_from_payload(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's entry point: :func:`train_loop` on the config that
    :func:`~unclip.training.engine.trainer.worker_config` pickled on the driver."""
    import ray.cloudpickle

    return train_loop(
        {**ray.cloudpickle.loads(config[PAYLOAD_KEY]), "progress_relay": config["progress_relay"]}
    )


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's per-worker function (see :func:`unclip.training.engine.trainer.fit`).

    Returns (rank 0's reaches the driver) ``{"status": "done"}``, or the step whose loss was
    not finite: a NaN stops every rank at the same step, before its update, with no checkpoint.
    """
    entered = time.perf_counter()
    task: TrainTask = config["task"]
    source: ShardSource = config["source"]
    cfg: TrainerConfig = config["cfg"]
    layout: StorageLayout = config["layout"]
    model_kind: str = config["model_kind"]
    run_name: str = config["run_name"]
    # The accelerator must be chosen before deepspeed is first imported in this process.
    os.environ["DS_ACCELERATOR"] = "cuda" if cfg.use_gpu else "cpu"
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    deepspeed = import_deepspeed()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    skip_unused_ops(deepspeed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    run_dir = layout.run_dir(model_kind, run_name)

    torch.manual_seed(cfg.seed)
    model = task.build_model()
    plan = StreamPlan.make(source.shards, rank, world, cfg.batch_size, cfg.shuffle_block, cfg.seed)
    num_samples = plan.num_samples
    task.setup(rank, world)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.warmup_steps, cfg.max_steps)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(cfg)
    )
    ema = Ema(engine.module, cfg.ema_decay, cfg.ema_update_after) if cfg.ema_decay > 0 else None
    if rank != 0:
        ema = None
    runlog = RunLog(run_dir) if rank == 0 else None

    start, state = _resume(engine, ema)
    saved = start
    ident = {
        "run_name": run_name,
        "model_kind": model_kind,
        "task": task.describe(),
        "trainer": cfg.model_dump(mode="json"),
    }
    if runlog is not None:  # rank 0 alone keeps the run's record
        runlog.resume(start)
        ensure_progress_handler()
        progress = TrainProgress(
            f"{model_kind} {run_name}", start, cfg.max_steps, relay=config.get("progress_relay")
        )
        params = {"run_name": run_name, "model_kind": model_kind, **ident["trainer"]}
        trackers = Trackers.open(cfg.report_to, run_dir, run_name, params, start)
    position = StreamPosition.resumed(state.get("stream"), plan, start * cfg.grad_accum, world)
    stream = RankStream(source, plan, cfg.prefetch_batches, cfg.decode_threads)
    batches = stream.batches(position.stream_step(start * cfg.grad_accum))
    data_wait, first_step_s = 0.0, None
    global_batch = cfg.batch_size * world * cfg.grad_accum
    window: dict[str, float] = {}
    window_steps, window_t0, row = 0, time.perf_counter(), {}
    last_report = time.monotonic()
    for step in range(start, cfg.max_steps):
        for micro in range(cfg.grad_accum):
            k = step * cfg.grad_accum + micro
            t0 = time.perf_counter()
            columns = next(batches)
            data_wait += time.perf_counter() - t0
            seed_micro_step(cfg.seed, k, rank)
            batch = to_device(task.batch(columns), device, dtype)
            loss, metrics = task.loss(engine, batch)
            # One small all-reduce per micro-step: the loss and metrics summed over ranks, and
            # whether any rank's loss is not finite, so every rank stops at the same step, before
            # its update, and nothing hangs. Rank 0 alone decides when to report to Ray Train;
            # the sum carries its decision. It runs while backward does (async), and the loss
            # stays a tensor: the one host read of the micro-step is after backward.
            names = sorted(metrics)
            due = rank == 0 and time.monotonic() - last_report >= cfg.report_every_s
            head = loss.detach().float().reshape(1)
            bad = (~torch.isfinite(head)).float()
            tail = [*(float(metrics[n]) for n in names), 0.0, float(due)]
            stats = torch.cat([head.nan_to_num(0.0, 0.0, 0.0), torch.tensor(tail, device=device)])
            stats[-2] = bad[0]
            pending = dist.all_reduce(stats, async_op=True)
            engine.backward(loss)
            pending.wait()
            summed = stats.tolist()
            if summed[-2] > 0:
                if runlog is not None:
                    runlog.flush()
                    trackers.close()
                value = float(head[0])
                shown = str(value) if not math.isfinite(value) else "non-finite (on another worker)"
                return {"nonfinite_step": step + 1, "nonfinite_loss": shown}
            report_due = summed[-1] > 0
            for n, v in zip(["loss", *names], summed[:-2], strict=True):
                window[n] = window.get(n, 0.0) + v / world / cfg.grad_accum
            engine.step()
        s = step + 1
        if first_step_s is None:
            first_step_s = time.perf_counter() - entered
        if ema is not None:
            ema.update(engine.module, s)
        window_steps += 1
        log_now = s % cfg.log_every == 0 or s == cfg.max_steps
        ckpt_now = s % cfg.checkpoint_every == 0 or s == cfg.max_steps
        if log_now:
            elapsed = time.perf_counter() - window_t0
            row = {
                "step": s,
                **{n: v / window_steps for n, v in window.items()},
                "lr": float(engine.get_lr()[0]),
                "epoch": s * global_batch / num_samples,
                "samples_per_s": window_steps * global_batch / max(elapsed, 1e-9),
                "data_wait_frac": data_wait / max(elapsed, 1e-9),  # rank 0 waiting on its stream
            }
            if runlog is not None:
                runlog.append(row)
                progress.log(s, row)
                trackers.log(s, row)
            window, window_steps, window_t0, data_wait = {}, 0, time.perf_counter(), 0.0
        if ckpt_now:
            if runlog is not None:  # the rows up to a checkpoint are on file before it exists
                runlog.flush()
                trackers.flush()
                if s < cfg.max_steps:  # the curve so far, while it trains (the end draws its own)
                    runlog.plot(f"{model_kind} · {run_name}")
            stream_state = position.state(s * cfg.grad_accum, source)
            _save_and_report(
                engine,
                ema,
                s,
                rank,
                {**ident, "stream": stream_state},
                row if log_now else {"step": s},
            )
            saved, last_report = s, time.monotonic()
        elif log_now and report_due:
            # Ray Train takes one report per controller poll (~2 s): reporting every logged
            # step would stall fast steps, so metrics.jsonl has every row, Ray Train some.
            ray.train.report(row)
            last_report = time.monotonic()
    if saved != cfg.max_steps:  # resumed from a checkpoint of a longer schedule
        raise ValueError(
            f"run {run_name}: its checkpoint is at step {saved}, beyond max_steps={cfg.max_steps}"
        )
    batches.close()
    final = {
        **(runlog.rows[-1] if runlog is not None and runlog.rows else {}),
        **stream_totals(stream, device, first_step_s or 0.0),
        "step": saved,
    }
    exported = _export(engine, task, cfg, ema, rank, f"{run_dir}/{EXPORT_DIRNAME}", final, ident)
    if runlog is not None:
        trackers.log(saved, {f"export/{k}": v for k, v in exported.items() if k != "step"})
        trackers.close()
        runlog.plot(f"{model_kind} · {run_name}")
    dist.barrier()
    return {"status": "done", "step": saved}


def _resume(engine: Any, ema: Ema | None) -> tuple[int, dict[str, Any]]:
    """Load Ray Train's latest checkpoint into the engine (and EMA): (step, trainer state)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, {}
    with checkpoint.as_directory() as d:
        return load_checkpoint(d, engine, ema, checkpoint.path)


def _save_and_report(
    engine: Any, ema: Ema | None, step: int, rank: int, ident: dict, metrics: dict
) -> None:
    """Every rank saves its DeepSpeed shard; rank 0 adds the trainer state; all report it."""
    import ray.train

    tmp = tempfile.mkdtemp(prefix=f"unclip-ckpt-{step}-")
    try:
        write_checkpoint(tmp, engine, ema, step, rank, ident)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_{step:09d}",
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export(
    engine: Any,
    task: TrainTask,
    cfg: TrainerConfig,
    ema: Ema | None,
    rank: int,
    export_dir: str,
    final: dict[str, Any],
    ident: dict[str, Any],
) -> dict[str, Any]:
    """Gather the weights (ZeRO-3 shards them), rank 0 evaluates and publishes the export.

    Returns the export's metrics on rank 0, nothing on the others."""
    import deepspeed
    import torch.distributed as dist

    state: dict[str, torch.Tensor] = {}
    metrics: dict[str, Any] = {}
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=cfg.zero_stage == 3):
        if rank == 0:
            for k, v in engine.module.state_dict().items():
                v = v.detach().cpu()
                state[k] = (v.float() if v.is_floating_point() else v).clone()
    if rank == 0:
        if ema is not None:
            state.update(ema.state_dict())
        model = task.build_model()
        model.load_state_dict(state)
        model.eval()
        metrics = {**final, **task.evaluate(model)}
        with tempfile.TemporaryDirectory(prefix="unclip-export-") as tmp:
            task.export(model, tmp)
            marker = {**ident, "metrics": metrics, "ema": ema is not None}
            publish_dir(tmp, export_dir, EXPORT_MARKER, marker)
    dist.barrier()
    return metrics
