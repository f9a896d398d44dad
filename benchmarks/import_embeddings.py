"""Importing clip-retrieval-layout embeddings vs reading them with embedding-reader, same run.

Writes ``--n`` synthetic pairs (random unit vectors, float16 as LAION ships them, D = ``--dim``)
in clip-retrieval's layout (``img_emb/``, ``text_emb/``, ``metadata/``; ``--parts`` parts), then
times, ``--repeat`` rounds, each round running every step once in turn (interleaved, so that on a
shared machine each step sees the same load):

1. **embedding-reader**: ``EmbeddingReader(img_emb, "parquet_npy", metadata)`` over every image
   vector with the caption and URL columns, plus the text vectors (``EmbeddingReader(text_emb,
   "npy")``): what a LAION user's loader reads, nothing written;
2. **unclip import**: ``import_embeddings`` into a fresh store: the same reads, normalisation,
   CLIP score, and the embedding Parquet written through temp name + rename, on the default
   ``write_threads`` (2), and again on one write thread;
3. **Parquet write alone**: the import's tables, already in memory, encoded by
   ``write_embedding_table`` one after another into memory (vectors ``fixed_size_binary[2·D]``),
   and the same tables with ``fixed_size_list<float16>[D]`` vectors written as files of pipeline
   version 1 were (PLAIN, snappy): why the vectors are stored as binary.

Prints a table: per step the median wall time, the median over rounds of its ratio to that
round's embedding-reader time (goal for the import: ≤ 1.2), the slowest round's ratio, and the
median CPU seconds of all threads (steadier than wall times on a shared machine); then the
store's bytes per pair. ``--n 2000`` checks that the script works.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unclip.datasets.embedding_file import (
    EMBEDDING_COLUMNS,
    vectors_to_numpy,
    write_embedding_table,
)
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


def as_lists(table: pa.Table) -> pa.Table:
    """The table with ``fixed_size_list<float16>[D]`` vectors (pipeline version 1's layout)."""
    for name in EMBEDDING_COLUMNS:
        x = vectors_to_numpy(table.column(name)).astype(np.float16)
        listed = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
        table = table.set_column(table.schema.get_field_index(name), name, listed)
    return table


def write_lists_alone(tables: list) -> None:
    """Encode each table as pipeline version 1 wrote it: list vectors PLAIN and snappy."""
    for table in tables:
        vectors = [f"{c}.list.element" for c in EMBEDDING_COLUMNS]
        pq.write_table(
            table,
            io.BytesIO(),
            compression={"key": "zstd", "caption": "zstd", **dict.fromkeys(vectors, "snappy")},
            row_group_size=table.num_rows,
            use_dictionary=["key", "caption", "url"],
            column_encoding={**dict.fromkeys(vectors, "PLAIN"), "clip_score": "PLAIN"},
            write_statistics=["key", "clip_score"],
            data_page_version="1.0",
        )


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all this process's threads) of one call ``fn(*args)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


STEPS = {
    "read": "embedding-reader read",
    "import": "unclip import (2 write threads)",
    "import_1": "unclip import (1 write thread)",
    "write": "Parquet write alone, fixed_size_binary",
    "write_lists": "Parquet write alone, fixed_size_list (before)",
}


def table(runs: list[dict[str, tuple[float, float]]]) -> str:
    """The printed table: median wall, median and worst ratio to the same round's read, CPU."""
    lines = [
        "| step | wall s (median) | × read (median) | × read (worst) | CPU s (median) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, name in STEPS.items():
        ratios = [r[key][0] / r["read"][0] for r in runs]
        wall = statistics.median(r[key][0] for r in runs)
        cpu = statistics.median(r[key][1] for r in runs)
        lines.append(
            f"| {name} | {wall:.2f} | {statistics.median(ratios):.2f} | {max(ratios):.2f} "
            f"| {cpu:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--parts", type=int, default=4)
    p.add_argument("--rows-per-shard", type=int, default=65536)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="unclip-import-bench-"))
    try:
        src = work / "laion"
        sizes = [args.n // args.parts + (i < args.n % args.parts) for i in range(args.parts)]
        write_clip_retrieval(str(src), sizes, args.dim)
        spec = ImportSpec(
            str(src), "clip-retrieval", "ViT-L-14", "bench", rows_per_shard=args.rows_per_shard
        )
        one_thread = dataclasses.replace(spec, write_threads=1)
        runs, store_bytes, tables, listed = [], 0, [], []
        for run in range(args.repeat):
            times = {
                "read": timed(read_with_embedding_reader, src, args.rows_per_shard),
                "import": timed(import_embeddings, StorageLayout(str(work / f"a{run}")), spec),
                "import_1": timed(
                    import_embeddings, StorageLayout(str(work / f"b{run}")), one_thread
                ),
            }
            if not tables:
                files = sorted((work / "a0" / "embeddings").rglob("*.parquet"))
                store_bytes = sum(f.stat().st_size for f in files)
                tables = [pq.read_table(f) for f in files]
                listed = [as_lists(t) for t in tables]
            times["write"] = timed(write_alone, tables)
            times["write_lists"] = timed(write_lists_alone, listed)
            runs.append(times)
            for store in ("a", "b"):
                shutil.rmtree(work / f"{store}{run}")
        print(
            f"{args.n} pairs × {args.dim}, {args.repeat} interleaved rounds, goal: import ≤ 1.2 × read"
        )
        print(table(runs))
        print(f"store: {store_bytes / args.n:.0f} bytes per pair")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
