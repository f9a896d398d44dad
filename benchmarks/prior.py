"""Prior training throughput: unclip under its trainer vs LAION's DALLE2-pytorch vs plain loops.

Times training samples/s, on this machine, of loops with the same model dimensions (width
``dim = heads × dim_head``, ``depth`` layers, ``heads`` heads, embedding dimension = width, because
DALLE2-pytorch's prior runs at the embedding's width), the same global batch ``B`` a step and the
same optimizer work (AdamW, gradient clipping at 1.0, fp32), on the same CPU budget of ``W``
cores:

1. **unclip**: ``unclip.training.engine.trainer.fit`` on the prior task (diffusers ``PriorTransformer``)
   with everything the demo config turns on: Ray Train ``TorchTrainer``, DeepSpeed over gloo
   (ZeRO stage ``--zero-stage``, 0 by default as in the demo: for a prior of ~1M weights, ZeRO-1's
   sharded optimizer step and all-gather cost ~10% here and save nothing), EMA, metrics rows, Ray
   Train reports and one checkpoint and export at the end. ``W`` workers of one CPU each on
   ``ray.init(num_cpus=W)`` (Ray gives a 1-CPU worker one torch thread), micro-batch ``B / W``
   per worker;
2. **plain loop, the trainer's layout**: unclip's own prior (the same ``PriorTask.loss``) in a
   plain torch loop, in ``W`` processes of one torch thread each, side by side, each on its own
   in-memory batches of ``B / W``, with no gradient exchange; the rate is the processes' rates
   summed. ``harness_overhead = 1 − unclip / this loop``: what Ray Train, DeepSpeed (its
   gradient all-reduce included), the stream, EMA, metrics and reports cost;
3. **plain loop, one process**: the same step in one process of ``W`` torch threads, batch ``B``,
   shown beside 2 so the reader sees what the layout alone changes;
4. **DALLE2-pytorch**: ``dalle2_pytorch.DiffusionPrior`` (``DiffusionPriorNetwork``, cosine
   schedule, x_0 prediction, 10% condition dropout, no text encodings) in the same plain step,
   in both layouts of 2 and 3; the headline ``ratio_vs_dalle2_pytorch`` (goal ≥ 1.0) takes the
   faster of the two. Its network pads the text encodings to ``max_text_len`` learned null
   tokens (256 by default) even when the prior is not conditioned on them; these rows use
   ``max_text_len=0``, the same 4-token sequence as unclip's prior (``--with-default-text-len``
   adds the default to the table, one process × ``W`` threads only: ~100× slower here).

All run at the same process priority (Ray's workers otherwise run at nice 15). Only the steady
state counts: the plain loops run ``--warmup`` untimed steps, then ``--repeats`` blocks of
``--steps`` steps, interleaved, half before and half after the trainer (a shared machine is
noisy; the loops not running meanwhile sit idle); the trainer's rate comes from its own
``metrics.jsonl`` windows of ``log_every`` steps, the first window skipped. Rates are medians
over blocks or windows, shown with min and max. Start-up (Ray, worker processes, DeepSpeed, the
first window) and teardown (checkpoint, export) are printed apart. Run it on an otherwise idle
machine: on an oversubscribed one the one-process loops' ``W`` OpenMP threads stall at every
parallel barrier while one-thread processes do not (seen: plain loop 50 samples/s, trainer
1,700, at load average 30 on 2 cores), and the comparison says nothing.

DALLE2-pytorch is never a dependency of unclip: on first use this script installs
``dalle2-pytorch==1.15.6`` and the small packages it imports with ``pip install --no-deps
--target`` into a cache folder (``--deps-dir``), which it appends to ``sys.path``; torch and the
rest come from the current environment, untouched. ``--no-install`` prints the command instead.

Usage: ``python benchmarks/prior.py [--batch 256] [--workers 2] [--repeats 6] [--trainer-windows 15]``.
The last line printed is one JSON object with the headline numbers: ``plain_loop_samples_per_s``
is the loop of 2 and ``dalle2_pytorch_samples_per_s`` DALLE2-pytorch's faster layout (the
``*_threads_*`` and ``*_processes_*`` keys give each layout).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.cloudpickle
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stores  # noqa: E402
from plain_loops import (  # noqa: E402
    Loop,
    PlainLoop,
    Step,
    adamw_step,
    both_layouts,
    count,
    interleaved,
    print_rates,
)
from stores import ArraySource  # noqa: E402

from unclip.datasets.storage import StorageLayout  # noqa: E402
from unclip.training.config import PriorConfig, TrainerConfig  # noqa: E402
from unclip.training.engine.runlog import read_rows  # noqa: E402
from unclip.training.engine.trainer import fit  # noqa: E402
from unclip.training.models.prior import PriorTask  # noqa: E402

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
    if str(deps_dir) not in sys.path:
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
def unclip_step(args: argparse.Namespace, batch: int, seed: int) -> tuple[Step, int]:
    """unclip's prior and its task's loss (the trainer's) as a plain training step on ``batch``."""
    task = make_task(args, prior_config(args))
    source = task.data()
    torch.manual_seed(0)
    model = task.build_model().train()
    rng = np.random.default_rng(seed)

    def next_loss() -> torch.Tensor:
        idx = rng.integers(0, args.pairs, batch)
        return task.loss(model, task.batch(source.columns(idx)))[0]

    return adamw_step(model, next_loss), count(model)


def dalle2_step(
    args: argparse.Namespace, max_text_len: int, batch: int, seed: int
) -> tuple[Step, int]:
    """LAION's DiffusionPrior (x_0 prediction, cosine schedule) as the same plain step."""
    dalle2 = import_dalle2(args.deps_dir, install=False)
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
    rng = np.random.default_rng(seed)

    def next_loss() -> torch.Tensor:
        i = torch.from_numpy(rng.integers(0, args.pairs, batch))
        return prior(text_embed=text[i], image_embed=image[i])

    return adamw_step(prior, next_loss), count(prior)


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
    if args.batch % args.workers:
        sys.exit(f"--batch {args.batch} must divide among --workers {args.workers}")

    import_dalle2(args.deps_dir, install=not args.no_install)
    torch.set_num_threads(args.workers)
    w, dim = args.workers, args.heads * args.dim_head
    print(
        f"model: width {dim} (= embedding dim), depth {args.depth}, heads {args.heads} × "
        f"{args.dim_head}; global batch {args.batch}; CPU budget {w} cores (trainer: {w} "
        f"workers × 1 CPU, batch {args.batch // w} each; plain loops: {w} processes × 1 torch "
        f"thread, batch {args.batch // w} each, and 1 process × {torch.get_num_threads()} torch "
        f"threads, batch {args.batch}); torch {torch.__version__}",
        flush=True,
    )
    unclip_threads, unclip_procs = both_layouts(
        "unclip prior, plain loop", functools.partial(unclip_step, args), w, args.batch
    )
    d2_threads, d2_procs = both_layouts(
        "DALLE2-pytorch prior (same 4 tokens)",
        functools.partial(dalle2_step, args, 0),
        w,
        args.batch,
    )
    loops: list[Loop] = [unclip_procs, unclip_threads, d2_procs, d2_threads]
    tr = interleaved(loops, args.warmup, args.steps, args.repeats, lambda: under_trainer(args))
    if args.with_default_text_len:
        slow = PlainLoop(
            f"DALLE2-pytorch prior (default 256 null text tokens), 1 process × {w} threads",
            *dalle2_step(args, 256, args.batch, 0),
            batch=args.batch,
        )
        slow.warm_up(1)
        slow.time_block(3)
        loops.append(slow)

    unclip_rate = statistics.median(tr["per_window"])
    print_rates(
        f"unclip prior under the trainer, {w} workers × 1 thread "
        f"(Ray Train + DeepSpeed ZeRO-{args.zero_stage}, EMA)",
        tr,
        loops,
        digits=0,
    )
    plain_rate, plain_threads_rate = (statistics.median(lp.rates) for lp in loops[:2])
    d2 = {"processes": statistics.median(d2_procs.rates)}
    d2["threads"] = statistics.median(d2_threads.rates)
    best = max(d2, key=d2.__getitem__)
    print(
        f"\nsamples/s: median (min, max) over the trainer's windows 2..{args.trainer_windows + 1} "
        f"of {args.log_every} steps, and over the plain loops' {args.repeats} blocks of "
        f"{args.steps} steps (interleaved, half before and half after the trainer, after "
        f"{args.warmup} untimed steps). The {w}-process loops exchange no gradients; their rate is "
        f"the processes' rates summed. Start-up is excluded from the rates: the trainer's column "
        f"is the fit's wall time outside the timed windows (Ray start, workers, DeepSpeed, first "
        f"window, checkpoint, export, shutdown); the plain loops' is their warm-up steps.\n"
        f"ratio vs DALLE2-pytorch {unclip_rate / d2[best]:.2f}× (its better layout: {best}; "
        f"goal ≥ 1.0×)\n"
        f"harness overhead {1 - unclip_rate / plain_rate:+.1%} (trainer vs the plain loop in the "
        f"trainer's layout, {w} processes × 1 thread); against the 1 process × {w} threads loop, "
        f"harness and layout together: {1 - unclip_rate / plain_threads_rate:+.1%}"
    )
    print(
        json.dumps(
            {
                "unclip_samples_per_s": round(unclip_rate, 1),
                "dalle2_pytorch_samples_per_s": round(d2[best], 1),
                "plain_loop_samples_per_s": round(plain_rate, 1),
                "ratio_vs_dalle2_pytorch": round(unclip_rate / d2[best], 3),
                "harness_overhead": round(1 - unclip_rate / plain_rate, 3),
                "workers": w,
                "plain_loop_layout": f"{w} processes x 1 thread",
                "plain_loop_threads_samples_per_s": round(plain_threads_rate, 1),
                "dalle2_pytorch_layout": best,
                "dalle2_pytorch_processes_samples_per_s": round(d2["processes"], 1),
                "dalle2_pytorch_threads_samples_per_s": round(d2["threads"], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
