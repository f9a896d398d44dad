"""Importing clip-retrieval-layout embeddings vs reading them with embedding-reader, same run.

Writes ``--n`` synthetic pairs (random unit vectors, float16 as LAION ships them, D = ``--dim``)
in clip-retrieval's layout (``img_emb/``, ``text_emb/``, ``metadata/``; ``--parts`` parts), then
times, best of ``--repeat``:

1. **embedding-reader**: ``EmbeddingReader(img_emb, "parquet_npy", metadata)`` over every image
   vector with the caption and URL columns, plus the text vectors (``EmbeddingReader(text_emb,
   "npy")``): what a LAION user's loader reads, nothing written;
2. **unclip import**: ``import_embeddings`` into a fresh store: the same reads, normalisation,
   CLIP score, and the embedding Parquet written through temp name + rename;
3. **Parquet write alone**: the import's tables, already in memory, encoded by
   ``write_embedding_table`` one after another into memory: the floor of any import that
   writes this format with pyarrow on one thread.

The three run interleaved, best of ``--repeat`` each. Prints the wall times, ``ratio = import /
read`` (goal ≤ 1.2), ``write_ratio = write alone / read``, the CPU seconds of each (all threads;
on a shared machine they vary less than the wall times) and the store's bytes per pair.
Headline figures come from a quiet machine; ``--n 2000`` checks that the script works.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from unclip.datasets.embedding_file import write_embedding_table
from unclip.datasets.embedding_import import ImportSpec, import_embeddings
from unclip.datasets.storage import StorageLayout
from unclip.datasets.synthetic_embeddings import write_clip_retrieval


def read_with_embedding_reader(src: Path, batch_size: int) -> int:
    """Every image vector with its metadata, then every text vector; the rows read."""
    from embedding_reader import EmbeddingReader

    image = EmbeddingReader(
        str(src / "img_emb"),
        file_format="parquet_npy",
        meta_columns=["caption", "url"],
        metadata_folder=str(src / "metadata"),
    )
    rows = 0
    for emb, meta in image(batch_size=batch_size, show_progress=False):
        rows += len(emb)
        assert len(meta) == len(emb)
    text = EmbeddingReader(str(src / "text_emb"), file_format="npy")
    for emb, _ in text(batch_size=batch_size, show_progress=False):
        np.asarray(emb)
    return rows


def write_alone(tables: list) -> None:
    """Encode each table as an embedding file into memory, one after another."""
    for table in tables:
        write_embedding_table(table, io.BytesIO())


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all this process's threads) of one call ``fn(*args)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--parts", type=int, default=4)
    p.add_argument("--rows-per-shard", type=int, default=65536)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="unclip-import-bench-"))
    try:
        src = work / "laion"
        sizes = [args.n // args.parts + (i < args.n % args.parts) for i in range(args.parts)]
        write_clip_retrieval(str(src), sizes, args.dim)
        spec = ImportSpec(
            str(src), "clip-retrieval", "ViT-L-14", "bench", rows_per_shard=args.rows_per_shard
        )
        best: dict[str, tuple[float, float]] = {}
        store_bytes, tables = 0, []
        for run in range(args.repeat):  # interleaved, so that each sees the same load
            layout = StorageLayout(str(work / f"store{run}"))
            times = {
                "read": timed(read_with_embedding_reader, src, args.rows_per_shard),
                "import": timed(import_embeddings, layout, spec),
            }
            if not tables:
                files = sorted((work / "store0" / "embeddings").rglob("*.parquet"))
                store_bytes = sum(f.stat().st_size for f in files)
                tables = [pq.read_table(f) for f in files]
            times["write_alone"] = timed(write_alone, tables)
            best = {k: min(v, best.get(k, v)) for k, v in times.items()}
        read_s, import_s, write_s = (best[k][0] for k in ("read", "import", "write_alone"))
        print(
            json.dumps(
                {
                    "n": args.n,
                    "dim": args.dim,
                    "embedding_reader_s": round(read_s, 3),
                    "import_s": round(import_s, 3),
                    "ratio": round(import_s / read_s, 3),
                    "write_alone_s": round(write_s, 3),
                    "write_ratio": round(write_s / read_s, 3),
                    "cpu_s": {k: round(v[1], 3) for k, v in best.items()},
                    "store_bytes_per_pair": round(store_bytes / args.n),
                    "goal": 1.2,
                }
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
