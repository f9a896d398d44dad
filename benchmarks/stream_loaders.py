"""How fast can one rank's share be read and decoded? unclip's stream against the usual loaders.

One rank's epoch (rank 0 of ``--world``) of a decoder store (``benchmarks/stores.py``: 64 px
JPEGs in tars with embedding Parquet, resized to 32 px as the demo's decoder trains), read as
micro-batches of ``--batch`` and consumed by nothing (the data side alone):

1. **stream**: ``RankStream`` with its prefetch thread (what the trainer runs), one decode
   thread, then ``--threads`` decode threads;
2. **DataLoader**: torch ``DataLoader`` with ``--threads`` worker processes over an
   ``IterableDataset`` that reads the same blocks (block ``b`` on worker ``b % workers``);
3. **Ray Data**: ``ray.data.from_items`` over the same blocks, ``map_batches`` reading and
   decoding them on ``--threads`` CPUs, ``iter_batches`` in the driver.

Each row is the median of ``--repeats`` epochs, the first (cold page cache, process start)
run apart. The last line printed is a JSON object.

Usage: ``python benchmarks/stream_loaders.py [--n 40000] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stores import write_store  # noqa: E402

from unclip.datasets.storage import StorageLayout  # noqa: E402
from unclip.datasets.stream import RankStream, StreamPlan, StreamStats  # noqa: E402
from unclip.datasets.stream_sources import ImagePairSource  # noqa: E402

BLOCK = 4096


def make_source(args: argparse.Namespace) -> ImagePairSource:
    root = os.path.join(args.root, f"decoder-{args.n}")
    manifest = write_store(root, args.n, 64, 64, -(-args.n // 40))
    return ImagePairSource(StorageLayout(root), manifest, "train", 0.0, image_size=32)


def read_block(source: ImagePairSource, plan: StreamPlan, block: int) -> dict[str, Any]:
    """Block ``block`` of epoch 0, as the stream reads it (no fill-in: the store is clean)."""
    raw = []
    stats = StreamStats()
    for shard, start, stop in plan.block_spans(0, block):
        raw += source.read(shard, start, stop, stats)
    samples = [source.decode(r) for r in raw]
    perm = plan.block_rng(0, block).permutation(len(samples))
    return source.collate([samples[i] for i in perm])


def batches_of(cols: dict[str, Any], b: int) -> Iterator[dict[str, Any]]:
    rows = len(cols["key"])
    for lo in range(0, rows, b):
        yield {k: v[lo : lo + b] for k, v in cols.items()}


class BlockDataset(torch.utils.data.IterableDataset):
    """The plan's blocks, split among DataLoader workers by block number."""

    def __init__(self, source: ImagePairSource, plan: StreamPlan) -> None:
        self.source, self.plan = source, plan

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        me, every = (info.id, info.num_workers) if info else (0, 1)
        for block in range(me, self.plan.num_blocks(), every):
            yield from batches_of(read_block(self.source, self.plan, block), self.plan.batch_size)


def time_epochs(name: str, epoch: Callable[[], int], repeats: int) -> dict[str, Any]:
    rates = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        n = epoch()
        rates.append(n / (time.perf_counter() - t0))
    row = {"loader": name, "first": rates[0], "samples_per_s": statistics.median(rates[1:])}
    print(f"{name:52} {row['first']:>9.0f} {row['samples_per_s']:>10.0f}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="/tmp/unclip-scale")
    parser.add_argument("--n", type=int, default=40_000)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    source = make_source(args)
    plan = StreamPlan.make(source.shards, 0, args.world, args.batch, BLOCK, seed=0)
    per_epoch = plan.steps_per_epoch * args.batch

    def count(it: Any) -> int:
        return sum(len(b["key"]) for b in it)

    def stream(threads: int) -> Callable[[], int]:
        def epoch() -> int:
            it = RankStream(source, plan, prefetch=4, decode_threads=threads).batches(0)
            return count(next(it) for _ in range(plan.steps_per_epoch))

        return epoch

    def dataloader() -> int:
        loader = torch.utils.data.DataLoader(
            BlockDataset(source, plan), batch_size=None, num_workers=args.threads
        )
        return count(loader)

    print(f"rank 0 of {args.world}: {per_epoch} samples an epoch, micro-batch {args.batch}")
    print(f"{'loader':52} {'first/s':>9} {'samples/s':>10}")
    rows = [
        time_epochs("unclip stream, prefetch thread, 1 decode thread", stream(1), args.repeats),
        time_epochs(
            f"unclip stream, prefetch thread, {args.threads} decode threads",
            stream(args.threads),
            args.repeats,
        ),
        time_epochs(f"torch DataLoader, {args.threads} worker processes", dataloader, args.repeats),
    ]
    import ray

    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)

    def ray_data() -> int:
        ds = ray.data.from_items([{"block": b} for b in range(plan.num_blocks())])
        ds = ds.map_batches(
            lambda batch: {
                k: np.asarray(v)
                for k, v in read_block(source, plan, int(batch["block"][0])).items()
            },
            batch_size=1,
        )
        return count(ds.iter_batches(batch_size=args.batch))

    rows.append(
        time_epochs(f"Ray Data, map_batches on {args.threads} CPUs", ray_data, args.repeats)
    )
    ray.shutdown()
    print(json.dumps({r["loader"]: round(r["samples_per_s"], 1) for r in rows}))


if __name__ == "__main__":
    main()
