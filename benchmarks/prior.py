"""Prior training throughput: unclip under its trainer vs LAION's DALLE2-pytorch vs a plain loop.

Times training samples/s, on this machine, of three loops with the same model dimensions (width
``dim = heads × dim_head``, ``depth`` layers, ``heads`` heads, embedding dimension = width, because
DALLE2-pytorch's prior runs at the embedding's width), the same global batch and the same
optimizer work (AdamW, gradient clipping at 1.0, fp32):

1. **unclip**: ``unclip.training.trainer.fit`` on the prior task (diffusers ``PriorTransformer``)
   with everything the demo config turns on: Ray Train ``TorchTrainer``, DeepSpeed over gloo
   (ZeRO stage ``--zero-stage``, 0 by default: for a prior of ~1M weights, ZeRO-1's sharded
   optimizer step and all-gather cost ~10% here and save nothing), EMA, metrics rows, Ray Train
   reports and one checkpoint and export at the end. ``W`` workers of one CPU each on
   ``ray.init(num_cpus=W)``, micro-batch ``B / W`` per worker;
2. **DALLE2-pytorch**: ``dalle2_pytorch.DiffusionPrior`` (``DiffusionPriorNetwork``, cosine
   schedule, x_0 prediction, 10% condition dropout, no text encodings) in a plain torch loop,
   one process with ``W`` torch threads, batch ``B``. Its network pads the text encodings to
   ``max_text_len`` learned null tokens (256 by default) even when the prior is not conditioned on
   them; the headline uses ``max_text_len=0``, the same 4-token sequence as unclip's prior
   (``--with-default-text-len`` adds the default to the table: ~100× slower here);
3. **plain loop**: unclip's own prior (the same ``PriorTask.loss``) in the same plain loop as 2.
   ``harness_overhead = 1 − unclip / plain loop``: what Ray Train, DeepSpeed, data parallelism
   over ``W`` one-thread workers instead of ``W`` threads, EMA, metrics and reports cost.

All three use the same CPU budget, ``W`` cores: W processes × 1 thread (Ray gives a 1-CPU worker
one torch thread), or 1 process × W threads; all at the same process priority (Ray's workers
otherwise run at nice 15). Only the steady state counts: the plain loops run ``--warmup``
untimed steps, then ``--repeats`` blocks of ``--steps`` steps, interleaved, half before and half
after the trainer (a shared machine is noisy); the trainer's rate comes from its own
``metrics.jsonl`` windows of ``log_every`` steps, the first window skipped. Rates are medians
over blocks or windows, shown with min and max. Start-up (Ray, worker processes, DeepSpeed, the
first window) and teardown (checkpoint, export) are printed apart. Run it on an otherwise idle
machine: on an oversubscribed one the plain loops' ``W`` OpenMP threads stall at every parallel
barrier while the trainer's one-thread workers do not (seen: plain loop 50 samples/s, trainer
1,700, at load average 30 on 2 cores), and the comparison says nothing.

DALLE2-pytorch is never a dependency of unclip: on first use this script installs
``dalle2-pytorch==1.15.6`` and the small packages it imports with ``pip install --no-deps
--target`` into a cache folder (``--deps-dir``), which it appends to ``sys.path``; torch and the
rest come from the current environment, untouched. ``--no-install`` prints the command instead.

Usage: ``python benchmarks/prior.py [--batch 256] [--workers 2] [--repeats 6] [--trainer-windows 15]``.
The last line printed is one JSON object with the headline numbers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.cloudpickle
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stores  # noqa: E402
from stores import ArraySource  # noqa: E402

from unclip.datasets.storage import StorageLayout  # noqa: E402
from unclip.training.config import PriorConfig, TrainerConfig  # noqa: E402
from unclip.training.prior import PriorTask  # noqa: E402
from unclip.training.runlog import read_rows  # noqa: E402
from unclip.training.trainer import fit  # noqa: E402

ray.cloudpickle.register_pickle_by_value(stores)  # Ray workers cannot import it by name

# DALLE2-pytorch 1.15.6 and what its modules import that an unclip environment lacks (its
# __init__ pulls in the trainer, VQGAN-VAE, x-clip and CoCa); versions that import together.
DALLE2_PACKAGES = [
    "dalle2-pytorch==1.15.6",
    "accelerate==1.15.0",
    "coca-pytorch==0.1.0",
    "einx==0.4.3",
    "ema-pytorch==0.8.3",
    "frozendict==2.5.1",
    "kornia==0.9.0",
    "kornia-rs==0.2.0",
    "loguru==0.7.3",
    "pytorch-warmup==0.2.0",
    "resize-right==0.0.2",
    "rotary-embedding-torch==0.9.1",
    "torch-einops-utils==0.2.0",
    "vector-quantize-pytorch==1.32.0",
    "x-clip==0.14.4",
]
DEFAULT_DEPS_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    / "unclip-benchmarks"
    / "dalle2-pytorch-1.15.6"
)


# --- setup ---------------------------------------------------------------------------------
def import_dalle2(deps_dir: Path, install: bool) -> Any:
    """``dalle2_pytorch``, from ``deps_dir`` (installed there with --no-deps on first use)."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target"]
    command += [str(deps_dir), *DALLE2_PACKAGES]
    if not (deps_dir / "dalle2_pytorch").is_dir():
        if not install:
            sys.exit("DALLE2-pytorch is not installed; run:\n  " + " ".join(command))
        print(f"installing DALLE2-pytorch 1.15.6 into {deps_dir} (--no-deps) ...", flush=True)
        subprocess.run(command, check=True)
    # Appended, not prepended: nothing in the folder may shadow the environment's packages.
    sys.path.append(str(deps_dir))
    torch_before = torch.__version__
    import dalle2_pytorch

    assert torch.__version__ == torch_before
    return dalle2_pytorch


def synthetic_embeddings(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(text, image) unit vectors: image = text direction plus noise, like CLIP pairs."""
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(n, dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    image = 0.8 * text + 0.6 * rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    return text, image.astype(np.float32)


def prior_config(args: argparse.Namespace, trainer: dict[str, Any] | None = None) -> PriorConfig:
    return PriorConfig(
        num_layers=args.depth,
        num_attention_heads=args.heads,
        attention_head_dim=args.dim_head,
        trainer=TrainerConfig(**(trainer or {})),
    )


def make_task(args: argparse.Namespace, cfg: PriorConfig) -> InMemoryPriorTask:
    """unclip's prior task on in-memory synthetic pairs (statistics taken from them)."""
    dim = args.heads * args.dim_head
    text, image = synthetic_embeddings(args.pairs, dim)
    return InMemoryPriorTask(
        layout=StorageLayout(tempfile.gettempdir()),
        manifest_version="benchmark",
        cfg=cfg,
        holdout_fraction=0.05,
        dim=dim,
        clip_id="synthetic",
        image_mean=image.mean(0).tolist(),
        image_std=image.std(0).tolist(),
        pairs=args.pairs,
    )


def embedding_columns(n: int, dim: int) -> dict[str, Any]:
    """The synthetic pairs as the columns an embedding stream yields."""
    text, image = synthetic_embeddings(n, dim)
    return {"text_embedding": text, "image_embedding": image}


@dataclass
class InMemoryPriorTask(PriorTask):
    """The prior task streaming in-memory pairs instead of a manifest's files."""

    pairs: int = 20000

    def data(self) -> ArraySource:
        return ArraySource(functools.partial(embedding_columns, self.pairs, self.dim), self.pairs)


# --- the plain loops -------------------------------------------------------------------------
class PlainLoop:
    """One model's training step in a plain torch loop, timed in blocks of steps."""

    def __init__(self, name: str, step: Callable[[], None], params: int) -> None:
        self.name, self.step, self.params = name, step, params
        self.startup_s = 0.0
        self.per_step: list[float] = []

    def warm_up(self, steps: int) -> None:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.startup_s = time.perf_counter() - t0

    def time_block(self, steps: int) -> None:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.per_step.append((time.perf_counter() - t0) / steps)


def adamw_step(
    model: torch.nn.Module, loss_of: Callable[[np.ndarray], torch.Tensor], args: argparse.Namespace
) -> Callable[[], None]:
    """A training step: a random batch, the loss, backward, clipping at 1.0, AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)
    rng = np.random.default_rng(0)

    def step() -> None:
        loss = loss_of(rng.integers(0, args.pairs, args.batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step


def plain_unclip(args: argparse.Namespace) -> PlainLoop:
    """unclip's prior and its task's loss (the trainer's) in a plain torch loop."""
    task = make_task(args, prior_config(args))
    source = task.data()
    torch.manual_seed(0)
    model = task.build_model().train()
    step = adamw_step(model, lambda idx: task.loss(model, task.batch(source.columns(idx)))[0], args)
    return PlainLoop("unclip prior, plain torch loop", step, count(model))


def plain_dalle2(args: argparse.Namespace, dalle2: Any, max_text_len: int) -> PlainLoop:
    """LAION's DiffusionPrior (x_0 prediction, cosine schedule) in the same plain loop."""
    dim = args.heads * args.dim_head
    torch.manual_seed(0)
    net = dalle2.DiffusionPriorNetwork(
        dim=dim,
        depth=args.depth,
        dim_head=args.dim_head,
        heads=args.heads,
        num_timesteps=1000,
        max_text_len=max_text_len,
    )
    prior = dalle2.DiffusionPrior(
        net=net,
        image_embed_dim=dim,
        timesteps=1000,
        cond_drop_prob=0.1,
        condition_on_text_encodings=False,
        predict_x_start=True,
        beta_schedule="cosine",
    ).train()
    text, image = (torch.from_numpy(a) for a in synthetic_embeddings(args.pairs, dim))

    def loss_of(idx: np.ndarray) -> torch.Tensor:
        i = torch.from_numpy(idx)
        return prior(text_embed=text[i], image_embed=image[i])

    tokens = "same 4 tokens" if max_text_len == 0 else f"default {max_text_len} null text tokens"
    name = f"DALLE2-pytorch prior, {tokens}"
    return PlainLoop(name, adamw_step(prior, loss_of, args), count(prior))


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- the trainer ---------------------------------------------------------------------------------
def under_trainer(args: argparse.Namespace) -> dict[str, Any]:
    """unclip's prior under ``fit`` on a fresh local Ray; rates from its metrics.jsonl."""

    if args.batch % args.workers:
        sys.exit(f"--batch {args.batch} must divide among --workers {args.workers}")
    steps = args.log_every * (args.trainer_windows + 1)
    cfg = prior_config(
        args,
        {
            "num_workers": args.workers,
            "zero_stage": args.zero_stage,
            "batch_size": args.batch // args.workers,
            "lr": 3e-4,
            "warmup_steps": 10,
            "max_steps": steps,
            "checkpoint_every": steps,  # one checkpoint, at the end (after the last window)
            "log_every": args.log_every,
            "ema_decay": 0.995,
            "ema_update_after": 10,
        },
    )
    return {**timed_fit(args, make_task(args, cfg), cfg.trainer, "prior"), "steps": steps}


def timed_fit(
    args: argparse.Namespace, task: Any, trainer_cfg: TrainerConfig, model_kind: str
) -> dict[str, Any]:
    """Run ``task`` under ``fit`` on a fresh local Ray; per-window rates from its metrics.jsonl."""
    import ray

    # Ray adds 15 to its workers' niceness over the raylet's (this process's); on a shared
    # machine that alone would slow them against the plain loops. The setting is an increment:
    # "0" keeps the workers at this process's own priority, the plain loops' priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    with tempfile.TemporaryDirectory(prefix=f"unclip-bench-{model_kind}-") as root:
        t0 = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        try:
            result = fit(task, trainer_cfg, StorageLayout(root), model_kind, "benchmark")
        finally:
            ray.shutdown()
        wall = time.perf_counter() - t0
        rows = read_rows(os.path.join(result.run_dir, "metrics.jsonl"))
    window_s = [args.log_every * args.batch / r["samples_per_s"] for r in rows]
    steady = window_s[1:]  # the first window holds the first steps (allocation, warm caches)
    return {
        "per_window": [args.log_every * args.batch / s for s in steady],
        "outside_loop_s": wall - sum(window_s),
        "first_window_s": window_s[0],
    }


# --- report --------------------------------------------------------------------------------------
def rate(batch: int, per_step: list[float]) -> tuple[float, float, float]:
    """(median, min, max) samples/s over timed blocks."""
    rates = [batch / s for s in per_step]
    return statistics.median(rates), min(rates), max(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim-head", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=256, help="global batch (all workers)")
    p.add_argument("--workers", type=int, default=2, help="trainer workers = CPU budget")
    p.add_argument("--pairs", type=int, default=20000)
    p.add_argument("--warmup", type=int, default=5, help="plain loops: untimed first steps")
    p.add_argument("--steps", type=int, default=20, help="plain loops: steps per timed block")
    p.add_argument("--repeats", type=int, default=6, help="plain loops: timed blocks")
    p.add_argument(
        "--zero-stage", type=int, default=0, choices=range(4), help="trainer: DeepSpeed ZeRO stage"
    )
    p.add_argument("--log-every", type=int, default=10, help="trainer: steps per window")
    p.add_argument("--trainer-windows", type=int, default=15, help="trainer: timed windows")
    p.add_argument(
        "--with-default-text-len",
        action="store_true",
        help="also time DALLE2-pytorch with its default 256 null text tokens (slow: minutes)",
    )
    p.add_argument("--deps-dir", type=Path, default=DEFAULT_DEPS_DIR)
    p.add_argument("--no-install", action="store_true")
    args = p.parse_args()

    dalle2 = import_dalle2(args.deps_dir, install=not args.no_install)
    torch.set_num_threads(args.workers)
    dim = args.heads * args.dim_head
    print(
        f"model: width {dim} (= embedding dim), depth {args.depth}, heads {args.heads} × "
        f"{args.dim_head}; global batch {args.batch}; CPU budget {args.workers} cores "
        f"(trainer: {args.workers} workers × 1 CPU; plain loops: 1 process × "
        f"{torch.get_num_threads()} torch threads); torch {torch.__version__}",
        flush=True,
    )
    plain, d2 = plain_unclip(args), plain_dalle2(args, dalle2, max_text_len=0)
    loops = [plain, d2]
    for loop in loops:
        loop.warm_up(args.warmup)
    # A shared machine is noisy: interleave the loops' blocks, half before the trainer, half after.
    before = (args.repeats + 1) // 2
    for _ in range(before):
        for loop in loops:
            loop.time_block(args.steps)
    tr = under_trainer(args)
    for _ in range(args.repeats - before):
        for loop in loops:
            loop.time_block(args.steps)
    if args.with_default_text_len:
        slow = plain_dalle2(args, dalle2, max_text_len=256)
        slow.warm_up(1)
        slow.time_block(3)
        loops.append(slow)

    unclip_rate = statistics.median(tr["per_window"])
    rows = [
        (
            f"unclip prior under the trainer (Ray Train + DeepSpeed ZeRO-{args.zero_stage}, EMA)",
            unclip_rate,
            min(tr["per_window"]),
            max(tr["per_window"]),
            tr["outside_loop_s"] + tr["first_window_s"],
            plain.params,
        )
    ]
    rows += [(lp.name, *rate(args.batch, lp.per_step), lp.startup_s, lp.params) for lp in loops]
    print()
    print(f"{'loop':<68} {'samples/s':>10} {'min':>8} {'max':>8} {'start-up s':>11} {'params':>9}")
    for name, med, lo, hi, start, params in rows:
        print(f"{name:<68} {med:>10.0f} {lo:>8.0f} {hi:>8.0f} {start:>11.1f} {params:>9}")
    plain_rate, d2_rate = rate(args.batch, plain.per_step)[0], rate(args.batch, d2.per_step)[0]
    print(
        f"\nsamples/s: median (min, max) over the trainer's windows 2..{args.trainer_windows + 1} "
        f"of {args.log_every} steps, and over the plain loops' {args.repeats} blocks of "
        f"{args.steps} steps (interleaved, half before and half after the trainer, after "
        f"{args.warmup} untimed steps). Start-up is excluded from the rates: the trainer's column "
        f"is the fit's wall time outside the timed windows (Ray start, workers, DeepSpeed, first "
        f"window, checkpoint, export, shutdown); the plain loops' is their warm-up steps.\n"
        f"ratio vs DALLE2-pytorch {unclip_rate / d2_rate:.2f}×; harness overhead "
        f"{1 - unclip_rate / plain_rate:+.1%} (trainer vs plain loop)"
    )
    print(
        json.dumps(
            {
                "unclip_samples_per_s": round(unclip_rate, 1),
                "dalle2_pytorch_samples_per_s": round(d2_rate, 1),
                "plain_loop_samples_per_s": round(plain_rate, 1),
                "ratio_vs_dalle2_pytorch": round(unclip_rate / d2_rate, 3),
                "harness_overhead": round(1 - unclip_rate / plain_rate, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
