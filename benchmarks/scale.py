"""Does training stay flat as the data set grows? Time to first step, memory, bytes read, speed.

For each size it writes a store in the project's own formats (``benchmarks/stores.py``: tars of
64 px JPEGs, embedding Parquet, a manifest; no HTTP), then:

- runs a short training job of the prior (embeddings) and of the decoder (64 px JPEGs decoded
  and resized to the demo's 32 px, joined with embeddings) under the one trainer (Ray Train +
  DeepSpeed, ``--workers`` CPU workers), and takes from its result the worst rank's time from
  worker start to the end of the first optimizer step, its peak RSS, and the steady samples/s
  (median of ``metrics.jsonl`` windows after the first);
- streams one whole epoch of each rank's share through the same source and plan, reading
  shards (not decoding them), and reports the worst rank's bytes read over ``total / world``;
- at the smallest size, runs the same model's loss in a plain torch loop over in-memory
  tensors of the same batches, with the trainer's process layout (``--workers`` processes of
  one torch thread each, side by side, no gradient exchange), and reports the trainer's speed
  over the loop's (``throughput_vs_loop``).

Sizes: prior 4k / 40k / 400k embeddings (D = 64), decoder 4k / 40k / 160k images, each store in
40 shards (a rank's first and last shard are shared with its neighbours, so fewer, larger
shards read more per rank); ``--quick`` shrinks them for a smoke run. Run on an idle machine. The last line
printed is one JSON object: ``rss_ratio``, ``first_step_ratio`` (largest size over smallest,
worst model), ``bytes_per_rank_ratio`` (worst), ``throughput_vs_loop`` (smallest size, worst).

Usage: ``python benchmarks/scale.py [--root /tmp/unclip-scale] [--workers 2] [--quick]``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_loops import ProcessLoop, Step, adamw_step, count  # noqa: E402
from stores import store_bytes, write_store  # noqa: E402

from unclip.datasets.storage import StorageLayout  # noqa: E402
from unclip.datasets.stream import RankStream, StreamPlan, StreamStats  # noqa: E402
from unclip.training.config import DecoderConfig, PriorConfig, TrainerConfig  # noqa: E402
from unclip.training.engine.runlog import read_rows  # noqa: E402
from unclip.training.engine.trainer import fit  # noqa: E402
from unclip.training.models.decoder import DecoderTask  # noqa: E402
from unclip.training.models.prior import PriorTask  # noqa: E402

SIZES = {"prior": [4_000, 40_000, 400_000], "decoder": [4_000, 40_000, 160_000]}
QUICK = {"prior": [2_000, 8_000], "decoder": [1_000, 4_000]}
SHARDS = 40  # at every size: 20 shards a rank at world 2, as a real store has many
DIM = 64


def trainer_cfg(args: argparse.Namespace, model: str) -> TrainerConfig:
    return TrainerConfig(
        num_workers=args.workers,
        zero_stage=0,
        batch_size=128 if model == "prior" else 16,
        lr=1e-3,
        warmup_steps=5,
        max_steps=args.steps,
        checkpoint_every=10**6,  # one checkpoint, at the end
        log_every=args.log_every,
        report_every_s=10.0,
        seed=0,
    )


def make_task(model: str, layout: StorageLayout, version: str, trainer: TrainerConfig) -> Any:
    if model == "prior":
        cfg = PriorConfig(trainer=trainer)
        return PriorTask.from_manifest(layout, version, cfg, 0.0)
    cfg = DecoderConfig(
        image_size=32,
        block_out_channels=[32, 64, 64],
        attention_levels=1,
        prediction_type="v_prediction",
        snr_gamma=5.0,
        trainer=trainer,
    )
    return DecoderTask.from_manifest(layout, version, cfg, 0.0)


def epoch_bytes(task: Any, world: int, batch: int) -> list[int]:
    """Bytes each rank reads in one epoch: its blocks' shards read through the task's source."""
    source = task.data()
    out = []
    for rank in range(world):
        plan = StreamPlan.make(source.shards, rank, world, batch, 4096, seed=0)
        stats = StreamStats()
        for block in range(plan.num_blocks()):
            for shard, start, stop in plan.block_spans(0, block):
                source.read(shard, start, stop, stats)
        out.append(stats.bytes_read)
    return out


def train_once(args: argparse.Namespace, model: str, n: int) -> dict[str, Any]:
    root = os.path.join(args.root, f"{model}-{n}")
    manifest = write_store(root, n, DIM, 0 if model == "prior" else 64, -(-n // SHARDS))
    layout = StorageLayout(root)
    cfg = trainer_cfg(args, model)
    task = make_task(model, layout, manifest["version"], cfg)
    run = f"{model}-{n}-{time.time_ns()}"
    result = fit(task, cfg, layout, model, run)
    rows = read_rows(os.path.join(result.run_dir, "metrics.jsonl"))
    rates = [r["samples_per_s"] for r in rows[1:]] or [rows[-1]["samples_per_s"]]
    per_rank = epoch_bytes(task, args.workers, cfg.batch_size)
    total = store_bytes(layout, manifest, images=model != "prior")
    m = result.metrics
    return {
        "model": model,
        "n": n,
        "first_step_s": m["first_step_s_max_rank"],
        "peak_rss_mb": m["peak_rss_mb_max_rank"],
        "bytes_ratio": max(per_rank) / (total / args.workers),
        "samples_per_s": statistics.median(rates),
        "replaced": m["stream_replaced"],
        "task": task,
        "cfg": cfg,
    }


# --- the plain loop: the same batches as in-memory tensors, the trainer's process layout ---------
def plain_step(task: Any, cfg: TrainerConfig, rank: int) -> tuple[Step, int]:
    """Rank ``rank``'s trainer batches, taken from the stream into memory, and the loss's step."""
    source = task.data()
    plan = StreamPlan.make(source.shards, rank, cfg.num_workers, cfg.batch_size, 4096, cfg.seed)
    stream = RankStream(source, plan, prefetch=0).batches(0)
    batches = itertools.cycle([task.batch(next(stream)) for _ in range(8)])
    torch.manual_seed(0)
    model = task.build_model().train()

    def next_loss() -> torch.Tensor:
        return task.loss(model, next(batches))[0]

    return adamw_step(model, next_loss, cfg.lr, cfg.weight_decay, cfg.grad_clip), count(model)


def plain_loop(task: Any, cfg: TrainerConfig, steps: int) -> float:
    """Samples/s of ``cfg.num_workers`` one-thread processes running the loss side by side."""
    build = functools.partial(plain_step, task, cfg)
    name = f"{type(task).__name__} plain loop"
    with ProcessLoop(name, build, cfg.num_workers, cfg.batch_size) as loop:
        loop.warm_up(5)
        loop.time_block(steps)
    return loop.rates[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="/tmp/unclip-scale", help="where the stores are kept")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps a training job")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    args = parser.parse_args()
    import ray

    # Ray workers at the driver's priority (Ray adds 15 to their niceness by default).
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    sizes = QUICK if args.quick else SIZES
    results = [train_once(args, model, n) for model in sizes for n in sizes[model]]
    ray.shutdown()
    loops = {}
    for model in sizes:
        small = next(r for r in results if r["model"] == model)
        loops[model] = plain_loop(small["task"], small["cfg"], steps=20)

    print(
        f"{'model':8} {'N':>8} {'first step s':>13} {'peak RSS MB':>12} "
        f"{'bytes/rank ÷ total/W':>21} {'samples/s':>10} {'replaced':>9}"
    )
    for r in results:
        print(
            f"{r['model']:8} {r['n']:>8} {r['first_step_s']:>13.2f} {r['peak_rss_mb']:>12.0f} "
            f"{r['bytes_ratio']:>21.3f} {r['samples_per_s']:>10.1f} {r['replaced']:>9.0f}"
        )
    vs_loop = {}
    for model, loop in loops.items():
        small = next(r for r in results if r["model"] == model)
        vs_loop[model] = small["samples_per_s"] / loop
        print(
            f"{model}: plain loop ({small['cfg'].num_workers} x 1-thread processes, in-memory "
            f"batches) {loop:.1f} samples/s; trainer streaming {small['samples_per_s']:.1f} "
            f"= {vs_loop[model]:.3f}x"
        )

    def ratio(key: str) -> float:
        worst = 0.0
        for model in sizes:
            rows = [r for r in results if r["model"] == model]
            worst = max(worst, rows[-1][key] / rows[0][key])
        return worst

    summary = {
        "rss_ratio": round(ratio("peak_rss_mb"), 3),
        "first_step_ratio": round(ratio("first_step_s"), 3),
        "bytes_per_rank_ratio": round(max(r["bytes_ratio"] for r in results), 3),
        "throughput_vs_loop": round(min(vs_loop.values()), 3),
        "throughput_vs_loop_by_model": {k: round(v, 3) for k, v in vs_loop.items()},
        "sizes": {m: v for m, v in sizes.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
