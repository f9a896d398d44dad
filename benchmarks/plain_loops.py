"""Plain torch training loops for the benchmarks' baselines, in either process layout.

The trainer runs ``W`` worker processes of one torch thread each. A baseline that runs one
process of ``W`` threads measures the layout as well as the harness, so a benchmark times its
loops in both layouts, with the same step:

- :class:`PlainLoop`: the step in this process, on this process's torch threads;
- :class:`ProcessLoop`: ``W`` spawned processes of one torch thread each, side by side, each
  running its own copy of the model on its own batches, with no gradient exchange; its rate is
  the processes' rates summed.

Both time blocks of steps after untimed warm-up steps and keep one samples/s figure per block,
so a benchmark can interleave their blocks with other runs on a noisy machine.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import torch

Step = Callable[[], None]
# build(rank) -> (step, trainable parameters); must pickle (a module-level function or a
# functools.partial of one): each process calls it to make its own model and batches.
StepBuilder = Callable[[int], tuple[Step, int]]


def count(model: torch.nn.Module) -> int:
    """Trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adamw_step(
    model: torch.nn.Module,
    next_loss: Callable[[], torch.Tensor],
    lr: float = 3e-4,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
) -> Step:
    """A training step, as the trainer's optimizer does it: loss, backward, clipping, AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)  # as the trainer

    def step() -> None:
        loss = next_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()

    return step


def summary(rates: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of per-block rates."""
    return statistics.median(rates), min(rates), max(rates)


class PlainLoop:
    """A training step run in this process (on its torch threads), timed in blocks of steps."""

    def __init__(self, name: str, step: Step, params: int, batch: int) -> None:
        self.name, self.step, self.params, self.batch = name, step, params, batch
        self.startup_s = 0.0  # the untimed warm-up steps
        self.rates: list[float] = []  # samples/s, one per timed block

    def warm_up(self, steps: int) -> None:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.startup_s = time.perf_counter() - t0

    def time_block(self, steps: int) -> None:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.rates.append(steps * self.batch / (time.perf_counter() - t0))

    def close(self) -> None:
        pass


def _serve(build: StepBuilder, rank: int, jobs: Any, done: Any, barrier: Any) -> None:
    """One process of a :class:`ProcessLoop`: build, then run each block it is sent."""
    torch.set_num_threads(1)  # as Ray Train gives a 1-CPU worker
    step, params = build(rank)
    done.put((rank, params))
    while (steps := jobs.get()) is not None:
        barrier.wait()  # every process starts the block together: side by side, not in turn
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        done.put((rank, time.perf_counter() - t0))


class ProcessLoop:
    """``workers`` one-thread processes running ``build(rank)``'s step side by side.

    No gradients are exchanged: each process trains its own copy on ``batch`` samples a step,
    so the summed rate is what the trainer's layout could reach with a free all-reduce.
    """

    def __init__(self, name: str, build: StepBuilder, workers: int, batch: int) -> None:
        self.name, self.batch = name, batch
        self.startup_s = 0.0  # the untimed warm-up steps (not the processes' start)
        self.rates: list[float] = []  # samples/s summed over the processes, one per timed block
        ctx = mp.get_context("spawn")
        self._jobs = [ctx.Queue() for _ in range(workers)]
        self._done = ctx.Queue()
        barrier = ctx.Barrier(workers)
        self._procs = [
            ctx.Process(target=_serve, args=(build, r, self._jobs[r], self._done, barrier))
            for r in range(workers)
        ]
        for p in self._procs:
            p.start()
        self.params = self._collect()[0]

    def _collect(self) -> list[Any]:
        """One answer from every process, by rank; raises if one died."""
        answers: dict[int, Any] = {}
        while len(answers) < len(self._procs):
            try:
                rank, value = self._done.get(timeout=5)
            except queue.Empty:
                dead = [p.exitcode for p in self._procs if p.exitcode is not None]
                if dead:
                    self.close()
                    raise RuntimeError(f"{self.name}: a process exited with {dead}") from None
                continue
            answers[rank] = value
        return [answers[r] for r in sorted(answers)]

    def _run(self, steps: int) -> list[float]:
        for jobs in self._jobs:
            jobs.put(steps)
        return self._collect()

    def warm_up(self, steps: int) -> None:
        self.startup_s = max(self._run(steps))

    def time_block(self, steps: int) -> None:
        self.rates.append(sum(steps * self.batch / s for s in self._run(steps)))

    def __enter__(self) -> ProcessLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for jobs, p in zip(self._jobs, self._procs, strict=True):
            if p.is_alive():
                jobs.put(None)
        for p in self._procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


Loop = PlainLoop | ProcessLoop
T = TypeVar("T")


def both_layouts(
    name: str, make: Callable[[int, int], tuple[Step, int]], workers: int, batch: int
) -> tuple[PlainLoop, ProcessLoop]:
    """``make(batch, seed)``'s step as 1 process × W threads on ``batch``, and as W one-thread
    processes on ``batch / workers`` each (seeded by rank): the same global batch a step."""
    per_rank = batch // workers
    threads = PlainLoop(f"{name}, 1 process × {workers} threads", *make(batch, 0), batch=batch)
    processes = ProcessLoop(
        f"{name}, {workers} processes × 1 thread", partial(make, per_rank), workers, per_rank
    )
    return threads, processes


def interleaved(
    loops: list[Loop], warmup: int, steps: int, repeats: int, between: Callable[[], T]
) -> T:
    """Warm the loops up, then time ``repeats`` blocks of each, interleaved, half before
    ``between()`` and half after (a shared machine is noisy); closes the loops; ``between()``'s
    value. Loops not running meanwhile, and all of them during ``between()``, sit idle."""
    try:
        for loop in loops:
            loop.warm_up(warmup)
        before = (repeats + 1) // 2
        for _ in range(before):
            for loop in loops:
                loop.time_block(steps)
        value = between()
        for _ in range(repeats - before):
            for loop in loops:
                loop.time_block(steps)
        return value
    finally:
        for loop in loops:
            loop.close()


def print_rates(trainer: str, fit: dict[str, Any], loops: list[Loop], digits: int) -> None:
    """The table: the trainer's row (``fit`` as ``prior.timed_fit`` returns it), then a row a
    loop: samples/s median, min, max, start-up seconds, trainable parameters."""
    windows = fit["per_window"]
    start = fit["outside_loop_s"] + fit["first_window_s"]
    rows = [(trainer, *summary(windows), start, loops[0].params)]
    rows += [(lp.name, *summary(lp.rates), lp.startup_s, lp.params) for lp in loops]
    width = max(len(r[0]) for r in rows)
    print(
        f"\n{'loop':<{width}} {'samples/s':>10} {'min':>8} {'max':>8} {'start-up s':>11} {'params':>9}"
    )
    for name, med, lo, hi, start, params in rows:
        print(
            f"{name:<{width}} {med:>10.{digits}f} {lo:>8.{digits}f} {hi:>8.{digits}f} "
            f"{start:>11.1f} {params:>9}"
        )
