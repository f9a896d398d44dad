"""Importing clip-retrieval-layout embeddings vs reading them with embedding-reader, same run.

Writes ``--n`` synthetic pairs (random unit vectors, float16 as LAION ships them, D = ``--dim``)
in clip-retrieval's layout (``img_emb/``, ``text_emb/``, ``metadata/``; ``--parts`` parts), then
times, best of ``--repeat``:

1. **embedding-reader**: ``EmbeddingReader(img_emb, "parquet_npy", metadata)`` over every image
   vector with the caption and URL columns, plus the text vectors (``EmbeddingReader(text_emb,
   "npy")``): what a LAION user's loader reads, nothing written;
2. **unclip import**: ``import_embeddings`` into a fresh store: the same reads, normalisation,
   CLIP score, and the embedding Parquet written through temp name + rename.

Prints both times and ``ratio = import / read`` (goal ≤ 1.2). Headline figures come from a quiet
machine; ``--n 2000`` checks that the script works.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

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


def best_of(repeat: int, fn) -> float:
    """The fastest of ``repeat`` timed calls of ``fn``."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


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
        read_s = best_of(args.repeat, lambda: read_with_embedding_reader(src, args.rows_per_shard))
        runs = iter(range(args.repeat))

        def run_import() -> None:
            layout = StorageLayout(str(work / f"store{next(runs)}"))
            spec = ImportSpec(
                str(src), "clip-retrieval", "ViT-L-14", "bench", rows_per_shard=args.rows_per_shard
            )
            import_embeddings(layout, spec)

        import_s = best_of(args.repeat, run_import)
        print(
            json.dumps(
                {
                    "n": args.n,
                    "dim": args.dim,
                    "embedding_reader_s": round(read_s, 3),
                    "import_s": round(import_s, 3),
                    "ratio": round(import_s / read_s, 3),
                    "goal": 1.2,
                }
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
