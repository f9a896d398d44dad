"""Curation: perceptual near-duplicates at ingest, and semantic dedup at scale and incrementally.

1. **Near-duplicate images** (recall / precision). ``--images`` distinct photo-like images
   (``unclip.datasets.synthetic_photos``: gradients, soft blobs and hard-edged shapes with grain,
   chosen over the demo's flat shapes because flat shapes collide perceptually) and, for
   ``--planted-fraction`` of them, one edited copy each — re-encoded at JPEG quality 35-70,
   resized to 60-85 %, cropped by 1-4 px a side, or colour-jittered, in turn — with a reworded
   caption and another URL. Every image goes through img2dataset's resizer as ingest runs it
   (``--image-size`` px, centre crop, JPEG 95), gets its pHash, and is checked against the
   images kept before it (``NearDuplicateIndex`` at ``--phash-distance``), in a shuffled order.
   Recall: planted copies dropped / planted; precision: planted copies among everything dropped.
   The exact dedups of today (url+caption hash, image sha256) are counted on the same set.
2. **Semantic dedup** (``unclip.datasets.semantic_dedup.curate``, faiss k-means): a store of
   ``--rows`` embeddings (D = ``--dim``) in partitions of ``--partition-rows``, clustered
   around 2000 centres with ``--semantic-planted`` of the rows near-copies (cosine ≈ 0.99) of an
   earlier row. Timed: the first run (fit + dedup), then a new partition of 10 % more rows
   (incremental: its rows assigned to the frozen centroids and compared with the kept members of
   their clusters, read from the version's ``kept/*.npy``), then a full re-cluster over
   everything; ``incremental_fraction`` is the incremental run over the full one.
   ``peak_rss_gb`` is this process's peak. ``--images 0`` times the semantic part alone.

Run it alone on the machine: the lead's figures are from a quiet machine. The last line is JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stores import write_shard  # noqa: E402

from unclip.datasets import dedup  # noqa: E402
from unclip.datasets.config import SemanticDedupConfig  # noqa: E402
from unclip.datasets.perceptual_hash import NearDuplicateIndex, phash_hex  # noqa: E402
from unclip.datasets.semantic_dedup import curate, removed_keys  # noqa: E402
from unclip.datasets.storage import StorageLayout  # noqa: E402
from unclip.datasets.synthetic_photos import EDITS, caption, edited_copy, jpeg, photo  # noqa: E402

SOURCE = "dedupbench000000"
CLIP_ID = "benchclip0000000"


def _resizer(image_size: int):
    import os

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.resizer import Resizer

    return Resizer(image_size, "center_crop", False, encode_quality=95, encode_format="jpg")


def near_duplicates(args: argparse.Namespace) -> dict:
    """Plant edited copies among distinct photos; run them through the ingest resizer and index."""
    rng = np.random.default_rng(args.seed)
    resize = _resizer(args.image_size)
    items = []  # (origin seed, is_copy, url, caption, encoded bytes)
    for s in range(args.images):
        items.append((s, False, f"http://a.example/{s}.jpg", caption(s), jpeg(photo(s, 128))))
    planted = rng.choice(args.images, int(args.planted_fraction * args.images), replace=False)
    for i, s in enumerate(planted):
        copy = edited_copy(photo(int(s), 128), EDITS[i % len(EDITS)], seed=args.seed + i)
        url = f"http://cdn{i % 3}.example/{s}.jpg"
        items.append((int(s), True, url, caption(int(s), 1 + i), jpeg(copy)))
    order = rng.permutation(len(items))
    items = [items[i] for i in order]
    start = time.perf_counter()
    index = NearDuplicateIndex(args.phash_distance, np.zeros(0, np.uint64), [])
    first_of: dict[int, int] = {}  # origin -> position kept first (the other is the planted dup)
    dropped, caught = 0, 0
    sha = set()
    sha_dups = 0
    for pos, (origin, _, _, _, data) in enumerate(items):
        img_str, *_rest, err = resize(io.BytesIO(data))
        if err:
            raise RuntimeError(f"resizer failed on image {origin}: {err}")
        h = int(phash_hex(img_str), 16)
        digest = hash(img_str)
        sha_dups += digest in sha
        sha.add(digest)
        if index.find(h) is None:
            index.add(h, str(pos))
            first_of.setdefault(origin, pos)
            continue
        dropped += 1
        caught += origin in first_of and first_of[origin] != pos  # a copy of a kept image
    seconds = time.perf_counter() - start
    hashes = dedup.url_caption_hashes([i[2] for i in items], [i[3] for i in items])
    url_caption_dups = int((~dedup.first_occurrence(hashes)).sum())
    return {
        "images": len(items),
        "planted": len(planted),
        "dropped": dropped,
        "recall": caught / max(len(planted), 1),
        "precision": caught / max(dropped, 1),
        "exact_url_caption_caught": url_caption_dups,
        "exact_sha256_caught": int(sha_dups),
        "phash_seconds": seconds,
    }


def _partition(rng: np.random.Generator, centres: np.ndarray, n: int, pool: list, planted: float):
    """n unit rows around random centres; ``planted`` of them near-copies of earlier rows."""
    x = 1.0 * centres[rng.integers(0, len(centres), n)] + rng.normal(size=(n, centres.shape[1]))
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    copies = []
    if pool:
        earlier = np.concatenate(pool)
        for i in np.flatnonzero(rng.random(n) < planted):
            src = earlier[rng.integers(len(earlier))]
            x[i] = src + 0.1 / np.sqrt(centres.shape[1]) * rng.normal(size=centres.shape[1])
            x[i] /= np.linalg.norm(x[i])
            copies.append(i)
    return x.astype(np.float32), copies


def _write(layout, rng, centres, shard, rows, pool, args, offset) -> list[str]:
    x, copies = _partition(rng, centres, rows, pool, args.semantic_planted)
    pool.append(x[rng.random(rows) < 0.2])  # copies come from a sample of what exists
    keys = [f"{offset + i:09d}" for i in range(rows)]
    write_shard(layout, shard, keys, x.shape[1], 0, args.seed, np.stack([x, x]), SOURCE, CLIP_ID)
    return [f"{SOURCE}/{keys[i]}" for i in copies]


def semantic(args: argparse.Namespace, root: str) -> dict:
    """Time the first run, a 10 % increment and a full re-cluster on a store of ``--rows``."""
    layout = StorageLayout(root)
    rng = np.random.default_rng(args.seed)
    centres = rng.normal(size=(2000, args.dim))
    pool: list[np.ndarray] = []
    planted: set[str] = set()
    n_parts = max(1, args.rows // args.partition_rows)

    def add_partitions(shards: range) -> None:
        for shard in shards:
            rows = args.partition_rows
            planted.update(_write(layout, rng, centres, shard, rows, pool, args, shard * rows))

    add_partitions(range(n_parts))
    # first_seen: the planted copy comes after its original, so recall counts the copies
    cfg = SemanticDedupConfig(
        similarity=args.similarity, cluster_size=args.cluster_size, keep="first_seen"
    )
    first = curate(layout, CLIP_ID, [SOURCE], cfg)
    extra = max(1, n_parts // 10)
    add_partitions(range(n_parts, n_parts + extra))
    inc = curate(layout, CLIP_ID, [SOURCE], cfg)
    removed_inc = removed_keys(layout, CLIP_ID)
    full = curate(layout, CLIP_ID, [SOURCE], cfg, recluster=True)
    removed = removed_keys(layout, CLIP_ID)
    hit = len(removed & planted)
    return {
        "rows": n_parts * args.partition_rows,
        "seconds_first": first.seconds,
        "seconds_incremental": inc.seconds,
        "seconds_full_rerun": full.seconds,
        "incremental_fraction": inc.seconds / full.seconds,
        "semantic_planted": len(planted),
        "semantic_recall": hit / max(len(planted), 1),
        "semantic_precision": hit / max(len(removed), 1),
        "semantic_removed_incremental": len(removed_inc),
        "clusters": int(round(n_parts * args.partition_rows / args.cluster_size)),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=2000, help="distinct photos (near-duplicate part)")
    p.add_argument("--planted-fraction", type=float, default=0.2)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--phash-distance", type=int, default=10)
    p.add_argument("--rows", type=int, default=200_000, help="embeddings of the semantic part")
    p.add_argument("--partition-rows", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--semantic-planted", type=float, default=0.1)
    p.add_argument("--similarity", type=float, default=0.95)
    p.add_argument("--cluster-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="storage root (default: a temporary folder)")
    args = p.parse_args()
    images = near_duplicates(args)
    with tempfile.TemporaryDirectory(prefix="unclip-dedup-bench-") as tmp:
        sem = semantic(args, args.root or tmp)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rows = [
        ("near-dup recall (pHash)", f"{images['recall']:.3f}", ">= 0.95"),
        ("near-dup precision (pHash)", f"{images['precision']:.3f}", ">= 0.95"),
        (
            "planted caught by url+caption / sha256",
            f"{images['exact_url_caption_caught']} / {images['exact_sha256_caught']} of {images['planted']}",
            "-",
        ),
        (
            f"semantic dedup, first run, {sem['rows']} rows",
            f"{sem['seconds_first']:.1f} s",
            "<= 60 s at 200k",
        ),
        ("+10 % partition (incremental)", f"{sem['seconds_incremental']:.1f} s", "-"),
        ("full re-cluster", f"{sem['seconds_full_rerun']:.1f} s", "-"),
        ("incremental / full", f"{sem['incremental_fraction']:.3f}", "<= 0.2"),
        (
            "semantic recall / precision",
            f"{sem['semantic_recall']:.3f} / {sem['semantic_precision']:.3f}",
            "-",
        ),
        ("peak RSS", f"{rss_gb:.2f} GB", "<= 2 GB at 200k"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, goal in rows:
        print(f"{name.ljust(width)}  {value:>24}  {goal}")
    seconds_200k = sem["seconds_first"] if sem["rows"] >= 200_000 else None
    print(
        json.dumps(
            {
                "recall": images["recall"],
                "precision": images["precision"],
                "seconds_200k": seconds_200k,
                "seconds_first": sem["seconds_first"],
                "rows": sem["rows"],
                "incremental_fraction": sem["incremental_fraction"],
                "peak_rss_gb": rss_gb,
                **{k: v for k, v in {**images, **sem}.items() if k not in ("recall", "precision")},
            }
        )
    )


if __name__ == "__main__":
    main()
