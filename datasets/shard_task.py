"""One shard task: hold the shard's lease, run one try in a child process, commit the unit.

A shard is a unit of three files of one try: ``{shard}.parquet`` (a row per URL),
``{shard}_stats.json`` (stats plus a *commit record*: the try's id and the byte size and sha256
of the tar and the Parquet) and ``{shard}.tar``, committed in that order, each durably
(``storage.atomic_write``). The tar is the completion marker, and ``shards.completed_shards``
counts it only when its size (and the Parquet's) match the commit record, so a torn or
zero-length tar, or a tar and a Parquet of different tries, is redone, never trusted.

Two tries of one shard (a Ray retry beside a try it thinks lost, a second run) never interleave:
each holds the shard's lease (``lease.py``) from before its download until after its commit, and
a try that finds the shard committed once it holds the lease returns the committed stats.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from typing import Any

import pyarrow as pa
from fsspec.core import url_to_fs

from .config import IngestConfig
from .lease import Lease, LeaseHeld
from .perceptual_hash import earlier_shard_hashes
from .shard_child import (
    SHARD_NAME_DIGITS,
    STARTUP_S,
    ShardDeadlineExceeded,
    ShardError,
    run_try,
)
from .shards import shard_committed
from .storage import StorageLayout, atomic_write, read_json, write_json

__all__ = [
    "ShardDeadlineExceeded",
    "ShardError",
    "download_shard",
]

# Failure messages that mean "the host or the network was down", not "this URL is bad".
_TRANSIENT = (
    "connection refused",
    "timed out",
    "temporary failure in name resolution",
    "unreachable",
)
SHARD_LEASE_TTL_S = 60.0  # a killed try's shard is free again this long after its last renewal
_NO_DEADLINE_WAIT_S = (
    3600.0  # how long a try waits for another try of its shard, without a deadline
)


def lease_wait_s(cfg: IngestConfig) -> float:
    """How long a try waits for another try of its shard: that try's longest life, plus the TTL."""
    if cfg.shard_deadline_s is None:
        return _NO_DEADLINE_WAIT_S
    return STARTUP_S + cfg.shard_deadline_s + SHARD_LEASE_TTL_S


def _all_transient(stats: dict[str, Any]) -> bool:
    """Every row failed, all with network-down errors: retry the shard rather than commit it."""
    if stats["count"] == 0 or stats["successes"] > 0:
        return False
    reasons = [r.lower() for r in stats.get("status_dict", {}) if r != "success"]
    return bool(reasons) and all(any(t in r for t in _TRANSIENT) for r in reasons)


def _digest(path: str) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def _put(local: str, remote: str) -> None:
    with open(local, "rb") as src, atomic_write(remote) as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)


def _commit(
    layout: StorageLayout, source: str, shard: int, out: str, stats: dict[str, Any], lease: Lease
) -> dict[str, Any]:
    """Write the unit: Parquet, stats with the commit record, then the tar (the marker)."""
    name = f"{shard:0{SHARD_NAME_DIGITS}d}"
    tar, parquet = os.path.join(out, f"{name}.tar"), os.path.join(out, f"{name}.parquet")
    stats = {
        **stats,
        "commit": {"try": uuid.uuid4().hex, "tar": _digest(tar), "parquet": _digest(parquet)},
    }
    lease.ensure()  # a try whose lease lapsed must not write over its successor
    _put(parquet, layout.image_shard_parquet(source, shard))
    write_json(layout.image_shard_stats(source, shard), stats)
    lease.ensure()
    _put(tar, layout.image_shard(source, shard))  # last: the shard now exists
    return stats


def _write_phash_index(
    layout: StorageLayout, source: str, shard: int, cfg: IngestConfig, tmp: str
) -> str | None:
    """The source's earlier pHashes as a local Arrow file for the child, or None when off."""
    if cfg.filters.phash_max_distance is None:
        return None
    table = earlier_shard_hashes(layout, source, shard)
    path = os.path.join(tmp, "phash_index.arrow")
    with pa.OSFile(path, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    return path


def download_shard(root: str, source: str, shard: int, cfg: IngestConfig) -> dict[str, Any]:
    """Download, resize and commit one shard; returns its stats (the committed ones if done)."""
    layout = StorageLayout(root)
    label = f"{source}/{shard:0{SHARD_NAME_DIGITS}d}"
    if shard_committed(layout, source, shard):  # committed by an earlier try
        return read_json(layout.image_shard_stats(source, shard))
    lease = Lease(
        layout.lease("images", source, f"{shard:05d}"), f"a try of shard {label}", SHARD_LEASE_TTL_S
    )
    with contextlib.ExitStack() as stack:
        try:  # a live try ends within its start-up and deadline; a dead one's lease in a TTL
            stack.enter_context(lease.hold(wait_s=lease_wait_s(cfg)))
        except LeaseHeld as e:
            raise ShardError(f"{label}: another try is still running: {e}") from None
        if shard_committed(layout, source, shard):  # the try we waited for committed it
            return read_json(layout.image_shard_stats(source, shard))
        in_fs, in_path = url_to_fs(layout.shard_input(source, shard))
        with tempfile.TemporaryDirectory(prefix="unclip-ingest-") as tmp:
            local_input = os.path.join(tmp, "input.feather")
            in_fs.get(in_path, local_input)
            out = os.path.join(tmp, "out")
            os.makedirs(out)
            phash_index = _write_phash_index(layout, source, shard, cfg, tmp)
            stats = run_try(local_input, out, shard, cfg, label, phash_index)
            if _all_transient(stats):
                raise ShardError(f"{label}: every download failed: {stats['status_dict']}")
            stats = _commit(layout, source, shard, out, stats, lease)
        in_fs.rm(in_path)
        return stats
