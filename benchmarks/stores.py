"""Storage roots in the project's own formats, written directly (no HTTP, no CLIP) for benchmarks.

Each shard is what ingest and embed leave behind: a webdataset tar of JPEGs with captions, the
img2dataset Parquet beside it (key, caption, status), and the embedding Parquet written by the
embed stage's writer; :func:`assemble_manifest` then names the dataset version and writes the
per-shard counts and embedding statistics. Embeddings are random unit vectors (a benchmark of
data movement needs their size, not their meaning). With ``image_size=0`` the tars are empty:
a store for the prior, which never reads images. :class:`ArraySource` serves in-memory columns
through the same stream, for benchmarks of the harness alone.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from unclip.datasets.embedding_file import file_metadata, vector_array, write_embedding_table
from unclip.datasets.manifest import assemble_manifest
from unclip.datasets.shards import write_shard_unit
from unclip.datasets.storage import StorageLayout, atomic_write
from unclip.datasets.stream import Columns, ShardSource, StreamShard, StreamStats

SOURCE = "bench00000000000"
CLIP_ID = "benchclip0000000"
COLOURS = np.array([[220, 40, 40], [40, 90, 220], [40, 170, 60], [230, 200, 40], [150, 60, 170]])


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A white image with one coloured rectangle, as JPEG (a few hundred bytes at 64 px)."""
    pixels = np.full((size, size, 3), 255, np.uint8)
    x0, y0 = rng.integers(0, size // 2, 2)
    w, h = rng.integers(size // 4, size // 2, 2)
    pixels[y0 : y0 + h, x0 : x0 + w] = COLOURS[rng.integers(len(COLOURS))]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shard(
    layout: StorageLayout,
    shard: int,
    keys: list[str],
    dim: int,
    image_size: int,
    seed: int,
    embeddings: np.ndarray | None = None,
    source: str = SOURCE,
    clip_id: str = CLIP_ID,
) -> None:
    """Commit one shard as ingest and embed would; ``embeddings`` [2, n, D] (image, text) unit
    rows, or random ones from ``seed`` when None."""
    rng = np.random.default_rng([seed, shard])
    captions = [f"shape {k}" for k in keys]
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for key, caption in zip(keys, captions, strict=True) if image_size else ():
            for ext, data in (
                ("jpg", _jpeg(rng, image_size)),
                ("txt", caption.encode()),
                ("json", json.dumps({"key": key, "caption": caption}).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    rows = pa.table({"key": keys, "caption": captions, "status": ["success"] * len(keys)})
    if embeddings is None:
        emb = rng.normal(size=(2, len(keys), dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=2, keepdims=True)
    else:
        emb = embeddings
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "caption": pa.array(captions, pa.string()),
            "url": pa.array([f"http://127.0.0.1/{k}.jpg" for k in keys], pa.string()),
            "image_embedding": vector_array(emb[0]),
            "text_embedding": vector_array(emb[1]),
            "clip_score": pa.array((emb[0] * emb[1]).sum(1), pa.float32()),
        }
    ).replace_schema_metadata(file_metadata(clip_id, dim, {"benchmark": True}, source, shard))
    parquet = io.BytesIO()
    pq.write_table(rows, parquet)
    with atomic_write(layout.embedding_shard(clip_id, source, shard)) as f:
        write_embedding_table(table, f)
    stats = {"count": len(keys), "successes": len(keys), "status_dict": {"success": len(keys)}}
    write_shard_unit(layout, source, shard, tar.getvalue(), parquet.getvalue(), stats)


def write_store(
    root: str, n: int, dim: int, image_size: int, shard_size: int, seed: int = 0
) -> dict:
    """A store of ``n`` samples in shards of ``shard_size``; returns its manifest (reused if made)."""
    layout = StorageLayout(root)
    done = Path(root) / "bench-store.json"
    want = {"n": n, "dim": dim, "image_size": image_size, "shard_size": shard_size, "seed": seed}
    want["format"] = 2  # shards committed with their commit record
    if not (done.exists() and json.loads(done.read_text()).get("params") == want):
        for shard, lo in enumerate(range(0, n, shard_size)):
            keys = [f"{i:09d}" for i in range(lo, min(n, lo + shard_size))]
            write_shard(layout, shard, keys, dim, image_size, seed)
        manifest = assemble_manifest(layout, CLIP_ID, [SOURCE])
        done.write_text(json.dumps({"params": want, "version": manifest["version"]}))
    return assemble_manifest(layout, CLIP_ID, [SOURCE])


def store_bytes(layout: StorageLayout, manifest: dict, images: bool) -> int:
    """Bytes of the files a stream of this manifest reads (embeddings, and tars with images)."""
    total = 0
    for entry in manifest["shards"]:
        total += Path(layout.join(entry["embeddings"])).stat().st_size
        if images:
            total += Path(layout.join(entry["images"])).stat().st_size
    return total


@dataclass
class ArraySource(ShardSource):
    """Columns held in memory (made once per process by ``make``), served as a stream.

    For benchmarks of the training harness itself: the trainer's stream (blocks, shuffle,
    prefetch thread) runs as in a real run, with no file read in the way.
    """

    make: Callable[[], Columns]
    n: int
    shard_size: int = 1000
    shards: list[StreamShard] = field(default_factory=list)
    _columns: Columns | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        sizes = [min(self.shard_size, self.n - i) for i in range(0, self.n, self.shard_size)]
        self.shards = [StreamShard(f"memory/{i:05d}", c) for i, c in enumerate(sizes)]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_columns": None}

    def columns(self, rows: np.ndarray) -> Columns:
        """The columns of these rows."""
        if self._columns is None:
            self._columns = self.make()
        return {k: v[rows] for k, v in self._columns.items()}

    def read(self, shard: int, start: int, stop: int, stats: StreamStats) -> list:
        base = shard * self.shard_size
        return list(range(base + start, base + stop))

    def collate(self, samples: list) -> Columns:
        return self.columns(np.asarray(samples, dtype=np.int64))
