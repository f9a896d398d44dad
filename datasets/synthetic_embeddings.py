"""Synthetic precomputed embeddings in clip-retrieval's and DataComp's layouts (tests, benchmarks).

Random unit vectors, float16 as LAION ships them, with a metadata Parquet per part (``url``,
``caption``, ``key``, ``similarity``); the same arguments give the same files.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .storage import atomic_write


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _metadata(part: int, n: int, text_col: str = "caption") -> pa.Table:
    return pa.table(
        {
            "url": [f"http://example.com/{part}/{i}.jpg" for i in range(n)],
            text_col: [f"a photo {part}-{i}" for i in range(n)],
            "key": [f"{part:05d}{i:04d}" for i in range(n)],
            "similarity": np.linspace(0.2, 0.4, n, dtype=np.float32),
        }
    )


def _write(path: str, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def write_clip_retrieval(out: str, parts: list[int], dim: int, seed: int = 0) -> None:
    """``img_emb/img_emb_{i}.npy``, ``text_emb/text_emb_{i}.npy``, ``metadata/metadata_{i}.parquet``.

    ``parts[i]`` is the number of rows of part i.
    """
    rng = np.random.default_rng(seed)
    for i, n in enumerate(parts):
        _write(f"{out}/img_emb/img_emb_{i}.npy", _npy(_unit(rng, n, dim)))
        _write(f"{out}/text_emb/text_emb_{i}.npy", _npy(_unit(rng, n, dim)))
        buf = io.BytesIO()
        pq.write_table(_metadata(i, n), buf)
        _write(f"{out}/metadata/metadata_{i}.parquet", buf.getvalue())


def write_datacomp(out: str, parts: list[int], dim: int, seed: int = 0) -> None:
    """DataComp's metadata shards: ``{i:08d}.npz`` (``l14_img``, ``l14_txt``, ``b32_img``,
    ``b32_txt``) beside ``{i:08d}.parquet`` (``url``, ``text``, ``key``, ``similarity``)."""
    rng = np.random.default_rng(seed)
    for i, n in enumerate(parts):
        buf = io.BytesIO()
        np.savez(
            buf,
            l14_img=_unit(rng, n, dim),
            l14_txt=_unit(rng, n, dim),
            b32_img=_unit(rng, n, 8),
            b32_txt=_unit(rng, n, 8),
        )
        _write(f"{out}/{i:08d}.npz", buf.getvalue())
        buf = io.BytesIO()
        pq.write_table(_metadata(i, n, text_col="text"), buf)
        _write(f"{out}/{i:08d}.parquet", buf.getvalue())
