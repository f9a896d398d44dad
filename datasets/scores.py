"""Score columns of one partition, computed when a manifest is made: nothing is stored in shards.

Per row: ``key``, ``caption``, ``clip_score`` (cosine of image and caption, from the embedding
file), ``phash`` and the original image size (from the image shard's Parquet, joined by key),
and one ``head:NAME`` column per user-supplied head. A head is a linear or small MLP over the
image embedding — LAION's aesthetic, NSFW and watermark predictors are of this kind — loaded
from a local ``.npz`` of ``w0, b0, w1, b1, ...`` (``w_i`` [in, out]) with ReLU between layers
and one output.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from .embedding_file import vectors_to_numpy
from .perceptual_hash import PHASH_COLUMN
from .storage import StorageLayout

IMAGE_COLUMNS = ("key", "original_width", "original_height", PHASH_COLUMN)


@dataclass(frozen=True)
class ScoreHead:
    """A loaded head: weights per layer and the sha256 of its file (part of a dataset version)."""

    path: str
    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    sha256: str

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """One score per row of ``x`` (float32 [N, D])."""
        h = x.astype(np.float32)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w + b
            if i < len(self.weights) - 1:
                h = np.maximum(h, 0.0)
        return h[:, 0]


def load_head(path: str, dim: int) -> ScoreHead:
    """Read a head from a local ``.npz``; errors name the file and the array at fault."""
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"score head {path}: no such file")
    with fs.open(p, "rb") as f:
        data = f.read()
    import io

    arrays = np.load(io.BytesIO(data))
    layers = sum(1 for k in arrays.files if k.startswith("w"))
    weights, biases, width = [], [], dim
    for i in range(layers):
        if f"w{i}" not in arrays.files or f"b{i}" not in arrays.files:
            raise ValueError(f"score head {path}: needs w{i} and b{i} (has {sorted(arrays.files)})")
        w, b = arrays[f"w{i}"].astype(np.float32), arrays[f"b{i}"].astype(np.float32)
        if w.ndim != 2 or w.shape[0] != width or b.shape != (w.shape[1],):
            raise ValueError(
                f"score head {path}: w{i} is {w.shape}, b{i} is {b.shape}; expected "
                f"w{i} [{width}, out] and b{i} [out]"
            )
        weights.append(w)
        biases.append(b)
        width = w.shape[1]
    if not layers or width != 1:
        raise ValueError(
            f"score head {path}: {layers} layers ending in width {width}; expected one output"
        )
    return ScoreHead(path, tuple(weights), tuple(biases), hashlib.sha256(data).hexdigest())


def _image_columns(path: str) -> pa.Table | None:
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        return None
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        names = [c for c in IMAGE_COLUMNS if c in pf.schema_arrow.names]
        return pf.read(columns=names)


def partition_scores(
    layout: StorageLayout,
    embedding_table: pa.Table,
    source: str,
    shard: int,
    heads: dict[str, ScoreHead],
) -> pa.Table:
    """The score columns of one partition, in the embedding file's row order.

    ``embedding_table`` holds the file's ``key``, ``caption``, ``clip_score`` and
    ``image_embedding``; image columns a shard lacks (older ingests) are null.
    """
    keys = embedding_table.column("key").to_pylist()
    cols: dict[str, pa.Array | list] = {
        "key": embedding_table.column("key"),
        "caption": embedding_table.column("caption"),
        "clip_score": embedding_table.column("clip_score"),
    }
    image = _image_columns(layout.image_shard_parquet(source, shard))
    by_key: dict[str, int] = {}
    if image is not None:
        by_key = {k: i for i, k in enumerate(image.column("key").to_pylist())}
    for name in IMAGE_COLUMNS[1:]:
        values = (
            image.column(name).to_pylist()
            if image is not None and name in image.column_names
            else None
        )
        cols[name] = [
            values[by_key[k]] if values is not None and k in by_key else None for k in keys
        ]
    if heads:
        x = vectors_to_numpy(embedding_table.column("image_embedding"))
        for name, head in sorted(heads.items()):
            cols[f"head:{name}"] = pa.array(head(x), pa.float32())
    return pa.table(cols)
