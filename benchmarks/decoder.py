"""Decoder throughput: training under unclip's trainer vs plain torch loops, and sampling speed.

1. **trainer**: ``unclip.training.engine.trainer.fit`` on the decoder task (diffusers
   ``UNet2DConditionModel``, Kandinsky-2.2 image conditioning) with Ray Train ``TorchTrainer``,
   DeepSpeed over gloo (ZeRO stage ``--zero-stage``, by default 0 as in the demo's decoder:
   ``configs/demo.yaml``), metrics rows, Ray Train reports and one checkpoint and export at the
   end. ``W`` workers of one CPU (one torch thread) each on ``ray.init(num_cpus=W)``,
   micro-batch ``B / W`` per worker; no EMA (the demo's decoder has one; this run leaves it off);
2. **plain loop, the trainer's layout**: the same model and the same ``DecoderTask.loss`` in a
   plain torch loop (AdamW, clipping at 1.0, fp32) in ``W`` processes of one torch thread each,
   side by side, each on its own batches of ``B / W``, with no gradient exchange; the rate is the
   processes' rates summed. ``harness_overhead = 1 − trainer / this loop``: what Ray Train,
   DeepSpeed (its gradient all-reduce included), the stream, metrics and reports cost;
3. **plain loop, one process**: the same step in one process of ``W`` torch threads, batch ``B``,
   shown beside 2 so the reader sees what the layout alone changes;
4. **sampling**: images/s of an exported decoder at ``--sample-steps`` DDIM steps with
   classifier-free guidance (two UNet passes a step), ``--sample-batch`` images at a time, in
   this process on ``W`` torch threads.

The model has the demo config's dimensions and objective (``configs/demo.yaml``: 32 px,
channels 32-64-64, attention at the lowest level, v-prediction with Min-SNR-5) unless
overridden; images and embeddings are random, drawn in memory (throughput does not depend on
the pixels). The timing method is benchmarks/prior.py's: steady state only (plain loops:
``--warmup`` untimed steps, then ``--repeats`` blocks of ``--steps`` steps interleaved, half
before and half after the trainer; trainer: its own ``metrics.jsonl`` windows of
``--log-every`` steps, the first skipped, ``--trainer-windows`` timed), medians with min and max,
start-up printed apart. The defaults (12 timed trainer windows of 10 steps, 6 blocks of 10
steps per loop) should take 3 to 4 minutes on 2 idle cores, going by the demo's ~0.55 s a
training step.

Usage: ``nice -n 5 python benchmarks/decoder.py [--batch 32] [--workers 2]``. The last line
printed is one JSON object with the headline numbers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from plain_loops import (  # noqa: E402
    Loop,
    Step,
    adamw_step,
    both_layouts,
    count,
    interleaved,
    print_rates,
)
from prior import timed_fit  # noqa: E402  (the trainer's timing, shared with the prior's)
from stores import ArraySource  # noqa: E402

from unclip.datasets.storage import StorageLayout  # noqa: E402
from unclip.training.config import DecoderConfig, TrainerConfig  # noqa: E402
from unclip.training.models.decoder import DecoderTask  # noqa: E402
from unclip.training.models.decoder_sampler import load_decoder  # noqa: E402


def image_columns(n: int, size: int, dim: int) -> dict[str, Any]:
    """Random images and unit embeddings, as the columns an image-pair stream yields."""
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    return {
        "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "image_embedding": emb / np.linalg.norm(emb, axis=1, keepdims=True),
    }


@dataclass(kw_only=True)
class InMemoryDecoderTask(DecoderTask):
    """The decoder task streaming random in-memory images and embeddings, not a manifest's files."""

    pairs: int = 512

    def data(self) -> ArraySource:
        make = functools.partial(image_columns, self.pairs, self.cfg.image_size, self.dim)
        return ArraySource(make, self.pairs, shard_size=128)


def decoder_config(
    args: argparse.Namespace, trainer: dict[str, Any] | None = None
) -> DecoderConfig:
    return DecoderConfig(
        image_size=args.image_size,
        block_out_channels=args.channels,
        attention_levels=args.attention_levels,
        prediction_type=args.prediction_type,
        snr_gamma=args.snr_gamma,
        trainer=TrainerConfig(**(trainer or {})),
    )


def make_task(args: argparse.Namespace, cfg: DecoderConfig) -> InMemoryDecoderTask:
    return InMemoryDecoderTask(
        layout=StorageLayout(tempfile.gettempdir()),
        manifest_version="benchmark",
        cfg=cfg,
        holdout_fraction=0.05,
        dim=args.dim,
        clip_id="synthetic",
        pairs=args.pairs,
    )


def decoder_step(args: argparse.Namespace, batch: int, seed: int) -> tuple[Step, int]:
    """The decoder and its task's loss (the trainer's) as a plain training step on ``batch``."""
    task = make_task(args, decoder_config(args))
    source = task.data()
    torch.manual_seed(0)
    model = task.build_model().train()
    rng = np.random.default_rng(seed)

    def next_loss() -> torch.Tensor:
        idx = rng.integers(0, args.pairs, batch)
        return task.loss(model, task.batch(source.columns(idx)))[0]

    return adamw_step(model, next_loss), count(model)


def under_trainer(args: argparse.Namespace) -> dict[str, Any]:
    """The decoder under ``fit`` on a fresh local Ray; rates from its metrics.jsonl."""

    if args.batch % args.workers:
        sys.exit(f"--batch {args.batch} must divide among --workers {args.workers}")
    steps = args.log_every * (args.trainer_windows + 1)
    cfg = decoder_config(
        args,
        {
            "num_workers": args.workers,
            "zero_stage": args.zero_stage,
            "batch_size": args.batch // args.workers,
            "lr": 3e-4,
            "warmup_steps": 5,
            "max_steps": steps,
            "checkpoint_every": steps,
            "log_every": args.log_every,
            "report_every_s": 10.0,
        },
    )
    return timed_fit(args, make_task(args, cfg), cfg.trainer, "decoder")


def sampling_rate(args: argparse.Namespace) -> list[float]:
    """Images/s of an exported decoder at ``--sample-steps`` DDIM steps (guided).

    The weights are the untrained ones: a sampling step costs the same whatever they are.
    """
    task = make_task(args, decoder_config(args))
    with tempfile.TemporaryDirectory(prefix="unclip-bench-decoder-export-") as d:
        task.export(task.build_model(), d)
        sampler = load_decoder(d)
    emb = torch.nn.functional.normalize(torch.randn(args.sample_batch, args.dim), dim=-1)
    sampler.sample(emb, steps=2, seed=0)  # warm-up
    rates = []
    for r in range(args.sample_repeats):
        t0 = time.perf_counter()
        sampler.sample(emb, steps=args.sample_steps, seed=r)
        rates.append(args.sample_batch / (time.perf_counter() - t0))
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64])
    p.add_argument("--attention-levels", type=int, default=1)
    p.add_argument("--dim", type=int, default=64, help="CLIP embedding dimension")
    p.add_argument("--prediction-type", default="v_prediction", help="the demo's objective")
    p.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR-γ (the demo's)")
    p.add_argument("--batch", type=int, default=32, help="global batch (all workers)")
    p.add_argument("--workers", type=int, default=2, help="trainer workers = CPU budget")
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--warmup", type=int, default=3, help="plain loops: untimed first steps")
    p.add_argument("--steps", type=int, default=10, help="plain loops: steps per timed block")
    p.add_argument("--repeats", type=int, default=6, help="plain loops: timed blocks")
    p.add_argument(
        "--zero-stage",
        type=int,
        default=0,
        choices=range(4),
        help="trainer: DeepSpeed ZeRO stage (the demo's decoder: 0)",
    )
    p.add_argument("--log-every", type=int, default=10, help="trainer: steps per window")
    p.add_argument("--trainer-windows", type=int, default=12, help="trainer: timed windows")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--sample-batch", type=int, default=8)
    p.add_argument("--sample-repeats", type=int, default=2)
    args = p.parse_args()

    if args.batch % args.workers:
        sys.exit(f"--batch {args.batch} must divide among --workers {args.workers}")
    torch.set_num_threads(args.workers)
    w = args.workers
    print(
        f"decoder: {args.image_size} px, channels {args.channels}, attention at the lowest "
        f"{args.attention_levels} level(s), embedding dim {args.dim}; global batch {args.batch}; "
        f"CPU budget {w} cores (trainer: {w} workers × 1 CPU, batch {args.batch // w} each; "
        f"plain loops: {w} processes × 1 torch thread, batch {args.batch // w} each, and 1 "
        f"process × {torch.get_num_threads()} torch threads, batch {args.batch}); "
        f"torch {torch.__version__}",
        flush=True,
    )
    threads, procs = both_layouts(
        "decoder, plain loop", functools.partial(decoder_step, args), w, args.batch
    )
    loops: list[Loop] = [procs, threads]
    tr = interleaved(loops, args.warmup, args.steps, args.repeats, lambda: under_trainer(args))
    samples = sampling_rate(args)

    trainer_rate = statistics.median(tr["per_window"])
    print_rates(
        f"decoder under the trainer, {w} workers × 1 thread "
        f"(Ray Train + DeepSpeed ZeRO-{args.zero_stage})",
        tr,
        loops,
        digits=1,
    )
    sample_rate = statistics.median(samples)
    print(
        f"sampling, {args.sample_steps} DDIM steps, guided: {sample_rate:.2f} images/s "
        f"(min {min(samples):.2f}, max {max(samples):.2f})"
    )
    plain_rate, plain_threads_rate = (statistics.median(lp.rates) for lp in loops)
    overhead = 1 - trainer_rate / plain_rate
    print(
        f"\nsamples/s: median (min, max) over the trainer's windows 2..{args.trainer_windows + 1} "
        f"of {args.log_every} steps and over the plain loops' {args.repeats} blocks of "
        f"{args.steps} steps (interleaved, half before and half after the trainer, after "
        f"{args.warmup} untimed steps). The {w}-process loop exchanges no gradients; its rate is "
        f"the processes' rates summed. The trainer's start-up column is the fit's wall time "
        f"outside the timed windows (Ray start, workers, DeepSpeed, first window, checkpoint, "
        f"export, shutdown); the plain loops' is their warm-up steps. Sampling: "
        f"{args.sample_batch} images a batch, median of {args.sample_repeats} batches, one "
        f"process × {w} threads.\n"
        f"harness overhead {overhead:+.1%} (trainer vs the plain loop in the trainer's layout, "
        f"{w} processes × 1 thread; goal ≤ 15%); against the 1 process × {w} threads loop, "
        f"harness and layout together: {1 - trainer_rate / plain_threads_rate:+.1%}"
    )
    print(
        json.dumps(
            {
                "trainer_samples_per_s": round(trainer_rate, 2),
                "plain_loop_samples_per_s": round(plain_rate, 2),
                "harness_overhead": round(overhead, 3),
                "sample_images_per_s": round(sample_rate, 3),
                "workers": w,
                "zero_stage": args.zero_stage,
                "plain_loop_layout": f"{w} processes x 1 thread",
                "plain_loop_threads_samples_per_s": round(plain_threads_rate, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
