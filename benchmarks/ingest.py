"""Ingest throughput: unclip (img2dataset's downloader in Ray tasks) vs plain img2dataset.

Serves N synthetic images on loopback, then times, with the same processes, threads, shard size,
image size and encoding:

1. ``img2dataset.download(distributor="multiprocessing")`` over one list of N URLs;
2. ``unclip.datasets.ingest.ingest_source`` over the same list, **cold** like img2dataset:
   the timer starts before ``ray.init(num_cpus=P)``, so Ray's start and its workers' first
   imports are inside it, as img2dataset's pool start and its workers' imports are inside its
   call. The headline ratio compares these two cold runs. The default shard size gives each
   process at most 4 shards, so img2dataset's pool (``maxtasksperchild=5``) never respawns and
   re-imports mid-run, which would dominate its time on a small machine;
3. **unclip, warm** (context, not in the ratio): the same list into a fresh root on the Ray that
   is now up with imported workers — what every later ingest of a long-lived driver sees;
   img2dataset has no warm form (each call starts its own pool);
4. an incremental refresh: 5 lists of N/5, the first 4 already ingested, a pass over all 5 (only
   the new one is downloaded), as a fraction of ingesting all 5 into an empty root (both warm).

Usage: ``python benchmarks/ingest.py [--n 5000] [--processes 2] [--threads 16]``. The last line
printed is one JSON object with the headline numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

# img2dataset's pool spawns its workers, which re-import this module: keep its top level light
# (unclip and Ray are imported in the functions that use them).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
IMAGE_SIZE = 64


def write_lists(table: pa.Table, directory: Path, parts: int) -> list[str]:
    n = table.num_rows
    paths = []
    for k in range(parts):
        lo, hi = k * n // parts, (k + 1) * n // parts
        path = directory / f"list{k}.parquet"
        pq.write_table(table.slice(lo, hi - lo), path)
        paths.append(str(path))
    return paths


def shard_seconds(folder: Path) -> float:
    """Sum of the shards' own download durations (img2dataset's ``duration`` in each stats file)."""
    files = [p for p in folder.rglob("*_stats.json") if p.name.split("_")[0].isdigit()]
    return sum(json.loads(p.read_text())["duration"] for p in files)


def run_img2dataset(url_list: str, out: Path, args: argparse.Namespace) -> tuple[float, int]:
    from img2dataset import download

    start = time.perf_counter()
    download(
        url_list=url_list,
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=["color", "shape"],
        output_format="webdataset",
        output_folder=str(out),
        processes_count=args.processes,
        thread_count=args.threads,
        number_sample_per_shard=args.samples_per_shard,
        image_size=IMAGE_SIZE,
        resize_mode="center_crop",
        encode_format="jpg",
        encode_quality=95,
        timeout=10,
        retries=0,
        distributor="multiprocessing",
        enable_wandb=False,
        incremental_mode="incremental",  # a fresh folder; "overwrite" deletes its own _tmp
    )
    seconds = time.perf_counter() - start
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return seconds, ok


def run_unclip(lists: list[str], root: Path, cfg: Any) -> tuple[float, int]:
    from unclip.datasets.ingest import ingest_source
    from unclip.datasets.storage import StorageLayout

    layout = StorageLayout(str(root))
    start = time.perf_counter()
    ok = sum(ingest_source(layout, path, cfg).successes for path in lists)
    return time.perf_counter() - start, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="synthetic images served")
    ap.add_argument("--processes", type=int, default=2, help="processes / Ray CPUs")
    ap.add_argument("--threads", type=int, default=16, help="download threads per process")
    ap.add_argument(
        "--samples-per-shard", type=int, default=None, help="default: n / (4 x processes)"
    )
    args = ap.parse_args()
    args.samples_per_shard = args.samples_per_shard or max(10, -(-args.n // (4 * args.processes)))
    logging.basicConfig(level=logging.WARNING)

    import ray

    from unclip.datasets.config import IngestConfig, SyntheticConfig
    from unclip.datasets.synthetic import serve_synthetic, url_list_table

    syn = SyntheticConfig(num_pairs=args.n, image_size=96, seed=0)
    cfg = IngestConfig(
        samples_per_shard=args.samples_per_shard,
        thread_count=args.threads,
        image_size=IMAGE_SIZE,
        allow_private_networks=True,
        shard_retries=0,
        timeout_s=10,
    )
    tmp = Path(tempfile.mkdtemp(prefix="unclip-bench-"))
    try:
        with serve_synthetic(syn) as base:
            table = url_list_table(syn, base)
            (tmp / "all").mkdir()
            (tmp / "five").mkdir()
            (one,) = write_lists(table, tmp / "all", 1)
            five = write_lists(table, tmp / "five", 5)

            i2d_s, i2d_ok = run_img2dataset(one, tmp / "i2d", args)
            i2d_shard_s = shard_seconds(tmp / "i2d")

            start = time.perf_counter()  # cold, as img2dataset's call: Ray's start is timed
            ray.init(num_cpus=args.processes, include_dashboard=False, log_to_driver=False)
            _, un_ok = run_unclip([one], tmp / "unclip", cfg)
            un_s = time.perf_counter() - start
            un_shard_s = shard_seconds(tmp / "unclip" / "images")
            warm_s, warm_ok = run_unclip([one], tmp / "unclip-warm", cfg)
            full_s, full_ok = run_unclip(five, tmp / "full5", cfg)
            run_unclip(five[:4], tmp / "refresh", cfg)
            refresh_s, refresh_ok = run_unclip(five, tmp / "refresh", cfg)
            ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    un_rate, i2d_rate = un_ok / un_s, i2d_ok / i2d_s
    ratio = un_rate / i2d_rate
    fraction = refresh_s / full_s
    print(
        f"\ningest of {args.n} synthetic images on loopback: {args.processes} processes x "
        f"{args.threads} threads, {args.samples_per_shard} per shard, {IMAGE_SIZE}px jpg"
    )
    header = f"{'run':<44} {'images':>7} {'seconds':>8} {'images/s':>9} {'in-shard images/s':>18}"
    print(header)
    print("-" * len(header))
    rows = [
        ("img2dataset.download (multiprocessing), cold", i2d_ok, i2d_s, i2d_shard_s),
        ("unclip ingest_source, cold (ray.init timed)", un_ok, un_s, un_shard_s),
        ("unclip ingest_source, warm Ray (context)", warm_ok, warm_s, None),
        ("unclip full ingest, 5 lists", full_ok, full_s, None),
        ("unclip refresh, 1 new list + 4 ingested", refresh_ok, refresh_s, None),
    ]
    for name, ok, s, shard_s in rows:
        in_shard = f"{ok / (shard_s / args.processes):>18.1f}" if shard_s else f"{'':>18}"
        print(f"{name:<44} {ok:>7} {s:>8.2f} {ok / s:>9.1f} {in_shard}")
    print(
        "(images/s: wall clock of the whole call, process start-up included; in-shard: images"
        " over the shards' own durations / processes)"
    )
    print(f"\nratio unclip / img2dataset images/s, both cold: {ratio:.3f}  (goal >= 0.9)")
    print(f"refresh / full ingest time:          {fraction:.3f}  (goal <= 0.3)")
    print(
        json.dumps(
            {
                "unclip_images_per_s": round(un_rate, 2),
                "img2dataset_images_per_s": round(i2d_rate, 2),
                "ratio": round(ratio, 4),
                "unclip_warm_images_per_s": round(warm_ok / warm_s, 2),
                "refresh_fraction": round(fraction, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
