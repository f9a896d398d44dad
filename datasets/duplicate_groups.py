"""The pure part of semantic dedup: k-means on unit vectors, and greedy dedup inside clusters.

k-means is faiss's (``faiss.Kmeans``, spherical): on 200k × 512 with 400 clusters it fitted and
assigned in 33 s where scikit-learn's MiniBatchKMeans took 202 s on the same two busy CPUs.

Inside a cluster the rows are visited in priority order (the keep rule), and a row is a
duplicate when its cosine similarity with a row *kept* before it — an earlier run's kept member
of the cluster, or a higher-priority row of this batch — reaches the threshold; it then names
the most similar such row. So every kept pair is below the threshold, and the result depends
only on the rows, their priorities and the centroids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_BLOCK = 1024  # rows compared at once: memory is a block × kept-so-far matrix of float32


def fit_centroids(
    x: np.ndarray, k: int, iterations: int, seed: int, per_centroid: int
) -> np.ndarray:
    """k unit-norm centroids of the unit rows ``x`` (float32 [N, D]), fitted on a seeded sample."""
    import faiss

    k = max(1, min(k, len(x)))
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iterations,
        seed=seed,
        spherical=True,
        max_points_per_centroid=per_centroid,
        verbose=False,
    )
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    c = km.centroids.astype(np.float32)
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the most similar centroid of each row (int32 [N])."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, nearest = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return nearest[:, 0].astype(np.int32)


@dataclass
class Duplicates:
    """Per batch row: index of the kept row it duplicates (-1: kept) and the similarity.

    Indices ``>= 0`` point into the batch; ``<= -2`` point into the bank: ``-2 - i`` is bank
    row ``i``.
    """

    of: np.ndarray  # int64 [N]
    similarity: np.ndarray  # float32 [N]


def find_duplicates(
    x: np.ndarray,
    clusters: np.ndarray,
    priority: np.ndarray,
    threshold: float,
    bank: np.ndarray | None = None,
    bank_clusters: np.ndarray | None = None,
) -> Duplicates:
    """Greedy dedup of batch rows ``x`` inside their clusters, after an already-kept ``bank``.

    ``priority``: lower is visited (and so kept) first. Bank rows are kept whatever they match.
    The bank may be float16 (as it is stored): one cluster's rows at a time are widened.
    """
    from threadpoolctl import threadpool_limits  # with the first dedup, not with the CLI

    n = len(x)
    out = Duplicates(np.full(n, -1, np.int64), np.zeros(n, np.float32))
    bank = np.zeros((0, x.shape[1]), np.float32) if bank is None else bank
    bank_clusters = np.zeros(0, np.int32) if bank_clusters is None else bank_clusters
    order = np.lexsort((priority, clusters))  # by cluster, then priority
    bounds = np.flatnonzero(np.diff(clusters[order])) + 1
    bank_order = np.argsort(bank_clusters, kind="stable")
    bank_sorted = bank_clusters[bank_order]
    # One cluster's products are small (a block against its kept rows): BLAS threads cost more
    # in wake-ups than they save there, and on busy CPUs many times more, so they run on one.
    with threadpool_limits(limits=1, user_api="blas"):
        for rows in np.split(order, bounds):
            if not len(rows):
                continue
            c = clusters[rows[0]]
            lo = np.searchsorted(bank_sorted, c, "left")
            hi = np.searchsorted(bank_sorted, c, "right")
            kept_ids = [-2 - bank_order[lo:hi].astype(np.int64)]
            kept_vecs = [bank[bank_order[lo:hi]].astype(np.float32, copy=False)]
            for start in range(0, len(rows), _BLOCK):
                block = rows[start : start + _BLOCK]
                _dedup_block(x, block, kept_ids, kept_vecs, threshold, out)
    return out


def _dedup_block(
    x: np.ndarray,
    block: np.ndarray,
    kept_ids: list[np.ndarray],
    kept_vecs: list[np.ndarray],
    threshold: float,
    out: Duplicates,
) -> None:
    """Mark the block's duplicates of rows kept so far, then of each other; extend the kept set."""
    xb = x[block]
    kept = np.concatenate(kept_vecs) if sum(len(v) for v in kept_vecs) else None
    dup = np.zeros(len(block), bool)
    if kept is not None:
        sims = xb @ kept.T
        best = sims.argmax(1)
        best_sim = sims[np.arange(len(block)), best]
        dup = best_sim >= threshold
        out.of[block[dup]] = np.concatenate(kept_ids)[best[dup]]
        out.similarity[block[dup]] = best_sim[dup]
    inner = xb @ xb.T
    candidate = np.tril(inner >= threshold, k=-1)  # [i, j]: j visited before i
    alive = ~dup
    for i in np.flatnonzero(candidate.any(1) & alive):
        js = np.flatnonzero(candidate[i] & alive)
        if len(js):
            j = js[np.argmax(inner[i, js])]
            alive[i] = False
            out.of[block[i]] = block[j]
            out.similarity[block[i]] = inner[i, j]
    kept_ids.append(block[alive].astype(np.int64))
    kept_vecs[:] = [kept, xb[alive]] if kept is not None else [xb[alive]]
