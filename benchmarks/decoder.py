"""Decoder throughput: training under unclip's trainer vs a plain torch loop, and sampling speed.

1. **trainer**: ``unclip.training.trainer.fit`` on the decoder task (diffusers
   ``UNet2DConditionModel``, Kandinsky-2.2 image conditioning) with Ray Train ``TorchTrainer``,
   DeepSpeed over gloo (ZeRO stage ``--zero-stage``, the demo's 2 by default), metrics rows, Ray
   Train reports and one checkpoint and export at the end. ``W`` workers of one CPU each on
   ``ray.init(num_cpus=W)``, micro-batch ``B / W`` per worker;
2. **plain loop**: the same model and the same ``DecoderTask.loss`` in a plain torch loop (AdamW,
   clipping at 1.0), one process with ``W`` torch threads, batch ``B``.
   ``harness_overhead = 1 − trainer / plain loop``.
3. **sampling**: images/s of the exported decoder at ``--sample-steps`` DDIM steps with
   classifier-free guidance (two UNet passes a step), ``--sample-batch`` images at a time.

The model has the demo config's dimensions and objective (``configs/demo.yaml``: 32 px,
channels 32-64-64, attention at the lowest level, v-prediction with Min-SNR-5) unless
overridden; images and embeddings are random, drawn in memory (throughput does not depend on
the pixels). The timing method is benchmarks/prior.py's,
whose helpers this script imports: steady state only (plain loop: untimed warm-up steps, then
blocks interleaved half before and half after the trainer; trainer: its own ``metrics.jsonl``
windows, the first skipped), medians with min and max, start-up printed apart.

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

from prior import PlainLoop, adamw_step, count, rate, timed_fit  # noqa: E402  (the shared timing helpers)
from stores import ArraySource  # noqa: E402

from unclip.datasets.storage import StorageLayout  # noqa: E402
from unclip.training.config import DecoderConfig, TrainerConfig  # noqa: E402
from unclip.training.decoder import DecoderTask, load_decoder  # noqa: E402


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


def plain_loop(args: argparse.Namespace) -> tuple[PlainLoop, InMemoryDecoderTask, Any]:
    task = make_task(args, decoder_config(args))
    source = task.data()
    torch.manual_seed(0)
    model = task.build_model().train()
    step = adamw_step(model, lambda idx: task.loss(model, task.batch(source.columns(idx)))[0], args)
    return PlainLoop("decoder, plain torch loop", step, count(model)), task, model


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


def sampling_rate(args: argparse.Namespace, task: InMemoryDecoderTask, model: Any) -> list[float]:
    """Images/s of the exported decoder at ``--sample-steps`` DDIM steps (guided)."""
    with tempfile.TemporaryDirectory(prefix="unclip-bench-decoder-export-") as d:
        task.export(model, d)
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
    p.add_argument("--warmup", type=int, default=3, help="plain loop: untimed first steps")
    p.add_argument("--steps", type=int, default=10, help="plain loop: steps per timed block")
    p.add_argument("--repeats", type=int, default=4, help="plain loop: timed blocks")
    p.add_argument("--zero-stage", type=int, default=2, help="trainer: DeepSpeed ZeRO stage")
    p.add_argument("--log-every", type=int, default=10, help="trainer: steps per window")
    p.add_argument("--trainer-windows", type=int, default=4, help="trainer: timed windows")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--sample-batch", type=int, default=8)
    p.add_argument("--sample-repeats", type=int, default=2)
    args = p.parse_args()

    torch.set_num_threads(args.workers)
    print(
        f"decoder: {args.image_size} px, channels {args.channels}, attention at the lowest "
        f"{args.attention_levels} level(s), embedding dim {args.dim}; global batch {args.batch}; "
        f"CPU budget {args.workers} cores (trainer: {args.workers} workers × 1 CPU; plain loop: "
        f"1 process × {torch.get_num_threads()} torch threads); torch {torch.__version__}",
        flush=True,
    )
    plain, task, model = plain_loop(args)
    plain.warm_up(args.warmup)
    before = (args.repeats + 1) // 2
    for _ in range(before):
        plain.time_block(args.steps)
    tr = under_trainer(args)
    for _ in range(args.repeats - before):
        plain.time_block(args.steps)
    samples = sampling_rate(args, task, model)

    trainer_rate = statistics.median(tr["per_window"])
    plain_rate, plain_lo, plain_hi = rate(args.batch, plain.per_step)
    sample_rate = statistics.median(samples)
    rows = [
        (
            f"decoder under the trainer (Ray Train + DeepSpeed ZeRO-{args.zero_stage})",
            trainer_rate,
            min(tr["per_window"]),
            max(tr["per_window"]),
            tr["outside_loop_s"] + tr["first_window_s"],
            plain.params,
        ),
        (plain.name, plain_rate, plain_lo, plain_hi, plain.startup_s, plain.params),
    ]
    print()
    print(f"{'loop':<60} {'samples/s':>10} {'min':>8} {'max':>8} {'start-up s':>11} {'params':>9}")
    for name, med, lo, hi, start, params in rows:
        print(f"{name:<60} {med:>10.1f} {lo:>8.1f} {hi:>8.1f} {start:>11.1f} {params:>9}")
    print(
        f"{f'sampling, {args.sample_steps} DDIM steps, guided (images/s)':<60} "
        f"{sample_rate:>10.2f} {min(samples):>8.2f} {max(samples):>8.2f}"
    )
    overhead = 1 - trainer_rate / plain_rate
    print(
        f"\nsamples/s: median (min, max) over the trainer's windows 2..{args.trainer_windows + 1} "
        f"of {args.log_every} steps and over the plain loop's {args.repeats} blocks of "
        f"{args.steps} steps (half before, half after the trainer, after {args.warmup} untimed "
        f"steps). The trainer's start-up column is the fit's wall time outside the timed windows "
        f"(Ray start, workers, DeepSpeed, first window, checkpoint, export, shutdown). Sampling: "
        f"{args.sample_batch} images a batch, median of {args.sample_repeats} batches.\n"
        f"harness overhead {overhead:+.1%} (trainer vs plain loop; goal ≤ 15%)"
    )
    print(
        json.dumps(
            {
                "trainer_samples_per_s": round(trainer_rate, 2),
                "plain_loop_samples_per_s": round(plain_rate, 2),
                "harness_overhead": round(overhead, 3),
                "sample_images_per_s": round(sample_rate, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
