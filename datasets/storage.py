"""The storage layout: every artifact path under the storage root is built here, and only here.

The root is an fsspec URI (a local folder, ``s3://bucket/prefix``, ``memory://x``). Writers go
through :func:`atomic_write` so a killed step never leaves a half-written file under its final
name. On a local disk the temporary is fsynced before the rename and the folder after it, so a
file under its final name survives a power loss whole; object stores make a PUT visible only
when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class StorageLayout:
    """Paths of every artifact under one storage root (see DESIGN.md, 'The flow of data')."""

    root: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", normalize_root(self.root))

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return url_to_fs(self.root)[0]

    def join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *[p.strip("/") for p in parts if p]])

    # --- sources and images ---------------------------------------------------------------
    def sources_dir(self) -> str:
        """Every registered source's URL list copy and origin record."""
        return self.join("sources")

    def source_list(self, source_id: str) -> str:
        """The copy of a URL list as ingested (Parquet), named by its content hash."""
        return self.join("sources", f"{source_id}.parquet")

    def source_origin(self, source_id: str) -> str:
        """Where a registered source's URL list lives (``{"url_list": ...}``), for its partition."""
        return self.join("sources", f"{source_id}.origin.json")

    def images_dir(self, source_id: str) -> str:
        return self.join("images", source_id)

    def image_shard(self, source_id: str, shard: int) -> str:
        return self.join("images", source_id, f"{shard:05d}.tar")

    def image_shard_parquet(self, source_id: str, shard: int) -> str:
        """img2dataset's per-row table of a shard (status, error message, metadata)."""
        return self.join("images", source_id, f"{shard:05d}.parquet")

    def image_shard_stats(self, source_id: str, shard: int) -> str:
        """A shard's stats, with the commit record that ties its tar and Parquet to one try."""
        return self.join("images", source_id, f"{shard:05d}_stats.json")

    def shard_inputs_dir(self, source_id: str) -> str:
        """Input slices for shard tasks; on the storage root so workers on any node read them."""
        return self.join("images", source_id, "_inputs")

    def shard_input(self, source_id: str, shard: int) -> str:
        """One shard's input slice (Arrow IPC file, the format img2dataset's Downloader reads)."""
        return self.join("images", source_id, "_inputs", f"{shard:05d}.feather")

    def ingest_plan(self, source_id: str) -> str:
        """How a source was split into shards (rows, samples per shard); fixed at first ingest."""
        return self.join("images", source_id, "_plan.json")

    def ingest_stats(self, source_id: str) -> str:
        """Summary of the last ingest run of a source that did work."""
        return self.join("images", source_id, "_ingest_stats.json")

    def ingest_rows(self, source_id: str) -> str:
        """The rows of a source that passed the pre-download filters: what its shards slice."""
        return self.join("images", source_id, "_rows.parquet")

    def prefiltered_rows(self, source_id: str) -> str:
        """The rows the pre-download filters removed, with a ``filter`` column naming why."""
        return self.join("images", source_id, "_prefiltered.parquet")

    def dedup_index_dir(self) -> str:
        """The (url, caption) hash index across sources: one Parquet file per source."""
        return self.join("images", "_dedup", "url_caption")

    def dedup_index(self, source_id: str) -> str:
        return self.join("images", "_dedup", "url_caption", f"{source_id}.parquet")

    # --- CLIP and embeddings --------------------------------------------------------------
    def clip_dir(self, clip_id: str) -> str:
        return self.join("clip", clip_id)

    def embeddings_dir(self, clip_id: str, source_id: str) -> str:
        return self.join("embeddings", clip_id, source_id)

    def embedding_shard(self, clip_id: str, source_id: str, shard: int) -> str:
        return self.join("embeddings", clip_id, source_id, f"{shard:05d}.parquet")

    # --- curation -------------------------------------------------------------------------
    def semdedup_dir(self, clip_id: str) -> str:
        """Semantic dedup state of one CLIP: a folder per centroid version, and ``current.json``."""
        return self.join("curation", clip_id, "semdedup")

    def semdedup_current(self, clip_id: str) -> str:
        """Pointer to the centroid version the manifest uses (switched last by a re-cluster)."""
        return self.join("curation", clip_id, "semdedup", "current.json")

    def semdedup_version(self, clip_id: str, version: str) -> str:
        return self.join("curation", clip_id, "semdedup", version)

    def semdedup_removals(self, clip_id: str, version: str, source: str, shard: int) -> str:
        """Removal list of one partition: ``key``, ``duplicate_of``, ``similarity``."""
        return self.join(
            "curation", clip_id, "semdedup", version, "removals", source, f"{shard:05d}.parquet"
        )

    def semdedup_kept(self, clip_id: str, version: str, source: str, shard: int) -> str:
        """Kept members of one partition with their cluster and embedding (for later partitions)."""
        return self.join(
            "curation", clip_id, "semdedup", version, "kept", source, f"{shard:05d}.parquet"
        )

    def manifest_removals(self, digest: str) -> str:
        """Rows a manifest leaves out of one shard (``key``, ``filter``), named by content."""
        return self.join("manifests", "removed", f"{digest}.parquet")

    # --- manifests ------------------------------------------------------------------------
    def manifests_dir(self) -> str:
        """Dataset versions (one JSON each), their statistics and removal lists."""
        return self.join("manifests")

    def _version_file(self, version: str, suffix: str) -> str:
        return self.join("manifests", version + suffix)

    def manifest(self, version: str) -> str:
        """A dataset version: its shards, sha256s, recipe and counts."""
        return self._version_file(version, ".json")

    def embedding_stats(self, version: str) -> str:
        """Mean and std of the served image and text embeddings of a version."""
        return self._version_file(version, ".stats.npz")

    def manifest_filter_report(self, version: str) -> str:
        """Kept fractions by filter, per partition, of a curated manifest."""
        return self._version_file(version, ".filters.json")

    def latest_manifest_pointer(self) -> str:
        """``{"version": ...}`` of the manifest assembled last."""
        return self.join("manifests", "latest.json")

    # --- training, evaluation, registry ---------------------------------------------------
    def runs_dir(self, model: str) -> str:
        return self.join("runs", model)

    def run_dir(self, model: str, run_name: str) -> str:
        return self.join("runs", model, run_name)

    def eval_dir(self, run_name: str) -> str:
        return self.join("eval", run_name)

    def latest_run(self, model: str) -> str:
        """Pointer to the newest finished run of a model (run name, export, dataset version)."""
        return self.join("runs", model, "latest.json")

    def registry(self, model: str) -> str:
        return self.join("registry", f"{model}.json")

    def asset_value(self, asset: str, partition: str) -> str:
        """The JSON of one pipeline asset's value (one partition of it)."""
        return self.join("values", asset, f"{partition}.json")

    # --- writer leases (lease.py) ------------------------------------------------------------
    def lease(self, *name: str) -> str:
        """The folder of the writer lease named ``name`` (e.g. ``("writer",)``, a source's shard)."""
        return self.join("_leases", *name)


def normalize_root(root: str) -> str:
    """Make a local root absolute (Ray workers may run in another cwd); leave URIs alone."""
    if "://" in root:
        return root.rstrip("/")
    return os.path.abspath(os.path.expanduser(root)).rstrip("/")


def exists(path: str) -> bool:
    fs, p = url_to_fs(path)
    return fs.exists(p)


def fsync_dir(path: str) -> None:
    """Make a rename or create in a local folder durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _local_atomic_write(p: str, mode: str) -> Iterator[IO[Any]]:
    parent = os.path.dirname(p)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, p)
        fsync_dir(parent)  # and the rename itself survives a power loss
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write to ``path`` through a temporary sibling, renamed into place only on success."""
    fs, p = url_to_fs(path)
    if isinstance(fs, LocalFileSystem):
        with _local_atomic_write(p, mode) as f:
            yield f
        return
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, mode) as f:
            yield f
        fs.mv(tmp, p)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)


def read_json(path: str) -> Any:
    """The JSON value stored at ``path``."""
    fs, p = url_to_fs(path)
    with fs.open(p, "r") as f:
        return json.load(f)


def read_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    """The Parquet table at ``path`` (only ``columns`` when given)."""
    import pyarrow.parquet as pq  # loaded with the first table, not with every path look-up

    fs, p = url_to_fs(path)
    with fs.open(p, "rb") as f:
        return pq.read_table(f, columns=columns)


def write_parquet(path: str, table: pa.Table) -> None:
    """Write ``table`` as Parquet to ``path`` atomically."""
    import pyarrow.parquet as pq

    with atomic_write(path) as f:
        pq.write_table(table, f)
