"""Training readers as Ray Datasets: embeddings (prior), image tars joined with embeddings (decoder).

One manifest entry is one read task, so files are read in parallel on the cluster; every file
gets the same checks as the in-memory readers (sha256 against the manifest, CLIP identity,
dimension, schema, the manifest's CLIP-score filter) through the same functions, and a bad file
fails the dataset with an error naming it. :func:`worker_split` shuffles under a seed and cuts
the rows into ``world`` equal parts — the same parts :func:`~unclip.datasets.readers.worker_embeddings`
computes in-process, so a Ray Train worker that holds only its share sees exactly these rows.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from .embedding_file import fixed_list_to_numpy
from .readers import (
    Split,
    _iter_pairs,
    _keep,
    _to_array,
    kept_mask,
    order_key,
    read_embedding_table,
    share_size,
)
from .shards import ShardReadStats
from .storage import StorageLayout

if TYPE_CHECKING:
    import ray.data

__all__ = ["embedding_dataset", "image_pair_dataset", "seeded_shuffle", "worker_split"]

log = logging.getLogger(__name__)

ORDER_COLUMN = "_order"


def _entries(manifest: dict[str, Any]) -> ray.data.Dataset:
    import ray.data

    items = [{"entry": json.dumps(e, sort_keys=True)} for e in manifest["shards"]]
    if not items:
        raise ValueError(f"dataset version {manifest.get('version')!r} lists no shards")
    return ray.data.from_items(items, override_num_blocks=len(items))


def _empty(d: int, image_size: int | None = None) -> dict[str, np.ndarray]:
    cols = {
        "key": np.array([], dtype=object),
        "caption": np.array([], dtype=object),
        "image_embedding": np.zeros((0, d), np.float32),
        "text_embedding": np.zeros((0, d), np.float32),
    }
    if image_size is not None:
        cols["image"] = np.zeros((0, image_size, image_size, 3), np.uint8)
    return cols


class _ReadEmbeddings:
    """Ray Data UDF: one manifest entry → its served rows of one split."""

    def __init__(
        self, layout: StorageLayout, manifest: dict[str, Any], split: Split, fraction: float
    ) -> None:
        self.layout, self.manifest, self.split, self.fraction = layout, manifest, split, fraction

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        m, d = self.manifest, int(self.manifest["embedding_dim"])
        out: list[dict[str, np.ndarray]] = []
        for raw in batch["entry"]:
            entry = json.loads(raw)
            t = read_embedding_table(
                self.layout,
                entry,
                m["clip_id"],
                d,
                columns=["key", "caption", "image_embedding", "text_embedding", "clip_score"],
            )
            gkeys = [f"{entry['source']}/{k}" for k in t.column("key").to_pylist()]
            mask = kept_mask(self.layout.join(entry["embeddings"]), t, m, entry)
            mask &= np.array([_keep(k, self.split, self.fraction) for k in gkeys], dtype=bool)
            out.append(
                {
                    "key": np.array(gkeys, dtype=object)[mask],
                    "caption": np.array(t.column("caption").to_pylist(), dtype=object)[mask],
                    "image_embedding": fixed_list_to_numpy(t.column("image_embedding"))[mask],
                    "text_embedding": fixed_list_to_numpy(t.column("text_embedding"))[mask],
                }
            )
        return _concat(out) if out else _empty(d)


class _ReadPairs:
    """Ray Data UDF: one manifest entry → its tar's samples joined with their embeddings."""

    def __init__(
        self,
        layout: StorageLayout,
        manifest: dict[str, Any],
        split: Split,
        fraction: float,
        image_size: int,
    ) -> None:
        self.layout, self.manifest, self.split, self.fraction = layout, manifest, split, fraction
        self.image_size = image_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        d = int(self.manifest["embedding_dim"])
        out: list[dict[str, np.ndarray]] = []
        for raw in batch["entry"]:
            one = {**self.manifest, "shards": [json.loads(raw)]}
            stats, skipped = ShardReadStats(), {}
            rows = list(_iter_pairs(self.layout, one, self.split, self.fraction, stats, skipped))
            skipped.pop("clip_score_filtered", None)
            if stats.corrupt or stats.truncated or any(skipped.values()):
                log.warning(
                    "%s: skipped %s, corrupt %d, truncated %d (first errors: %s)",
                    one["shards"][0]["images"],
                    skipped,
                    stats.corrupt,
                    stats.truncated,
                    stats.errors[:3],
                )
            if not rows:
                continue
            out.append(
                {
                    "key": np.array([g for g, *_ in rows], dtype=object),
                    "caption": np.array([s.caption for _, s, _, _ in rows], dtype=object),
                    "image": np.stack([_to_array(s.image, self.image_size) for _, s, _, _ in rows]),
                    "image_embedding": np.stack([ie for *_, ie, _ in rows]),
                    "text_embedding": np.stack([te for *_, te in rows]),
                }
            )
        return _concat(out) if out else _empty(d, self.image_size)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def embedding_dataset(
    layout: StorageLayout,
    manifest: dict[str, Any],
    split: Split,
    holdout_fraction: float,
    num_cpus: float = 1.0,
) -> ray.data.Dataset:
    """Rows ``key, caption, image_embedding, text_embedding`` (float32 [D]) of one split."""
    fn = _ReadEmbeddings(layout, manifest, split, holdout_fraction)
    return _entries(manifest).map_batches(fn, batch_size=1, batch_format="numpy", num_cpus=num_cpus)


def image_pair_dataset(
    layout: StorageLayout,
    manifest: dict[str, Any],
    split: Split,
    holdout_fraction: float,
    image_size: int,
    num_cpus: float = 1.0,
) -> ray.data.Dataset:
    """Rows ``key, caption, image`` (uint8 [S, S, 3]) ``, image_embedding, text_embedding``.

    The tar's samples joined with the embedding file of the same shard by key; samples with
    no embedding, corrupt members and truncated tars are counted skips, logged per shard.
    """
    fn = _ReadPairs(layout, manifest, split, holdout_fraction, image_size)
    return _entries(manifest).map_batches(fn, batch_size=1, batch_format="numpy", num_cpus=num_cpus)


def _with_order(batch: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    batch[ORDER_COLUMN] = np.array([order_key(seed, str(k)) for k in batch["key"]], np.int64)
    return batch


def seeded_shuffle(ds: ray.data.Dataset, seed: int) -> ray.data.Dataset:
    """``ds`` in the seeded order of its ``key`` column: the same for any block layout.

    (``Dataset.random_shuffle(seed=…)`` is only repeatable for the same blocks; this order
    is a function of the keys and the seed alone.)
    """
    ordered = ds.map_batches(_with_order, fn_kwargs={"seed": seed}, batch_format="numpy")
    return ordered.sort([ORDER_COLUMN, "key"]).drop_columns([ORDER_COLUMN])


def worker_split(ds: ray.data.Dataset, world: int, seed: int) -> list[ray.data.Dataset]:
    """``world`` datasets of equal row counts, rank r's rows r*n..(r+1)*n of the seeded order.

    The ``N % world`` rows past ``world * n`` go to no rank, so every worker takes the same
    number of batches and none hangs waiting on a rank with a longer shard.
    """
    shuffled = seeded_shuffle(ds, seed).materialize()
    n = share_size(shuffled.count(), world)
    parts = shuffled.split_at_indices([n * r for r in range(1, world + 1)])
    return list(parts[:world])
