"""Source planning: a URL list read and checked, filtered and split into fixed shard slices at
first sight (under the source's plan lease), and the input slices of missing shards written.

The rows kept and the split are fixed by ``_plan.json``, written last as the plan's commit:
later filter settings, sources or concurrent runs never change an ingested source's shards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from . import dedup
from .config import IngestConfig
from .filters import prefilter
from .lease import Lease, LeaseHeld
from .shards import completed_shards
from .storage import (
    StorageLayout,
    atomic_write,
    exists,
    read_json,
    read_parquet,
    write_json,
    write_parquet,
)
from .url_lists import read_url_list, source_id

PLAN_WAIT_S = 600.0  # how long a first plan waits for another writer planning the same source


def write_shard_inputs(
    layout: StorageLayout, source: str, table: pa.Table, shards: list[int], n: int, first: int = 0
) -> None:
    """Each of ``shards``' input slice as the Arrow file its task copies: shard ``s`` gets rows
    ``(s - first) * n`` onwards, ``n`` of them (``first``: the shard ``table`` starts at)."""
    for shard in shards:
        part = table.slice((shard - first) * n, n)
        with (
            atomic_write(layout.shard_input(source, shard)) as f,
            pa.ipc.new_file(f, part.schema) as w,
        ):
            w.write_table(part)


@dataclass
class SourcePlan:
    """A source's fixed split and the shards still to download."""

    source_id: str
    num_rows: int  # rows kept by the pre-download filters: what the shards slice
    shards_total: int
    pending: list[int]  # shards without a committed tar; their input slices are written
    filtered: dict[str, int] = field(default_factory=dict)  # pre-download removals


def _filter_rows(
    layout: StorageLayout, source: str, table: pa.Table, cfg: IngestConfig, url_list: str
) -> tuple[pa.Table, pa.Table, dict[str, int], list[str]]:
    """(kept, removed, counts, notes): pre-download filters, then (url, caption) dedup."""
    pf = prefilter(table, cfg.filters, url_list)
    kept, removed, counts = pf.kept, pf.removed, dict(pf.counts)
    if cfg.filters.dedup_url_caption:
        hashes = dedup.url_caption_hashes(
            kept.column("url").to_pylist(), kept.column("caption").to_pylist()
        )
        dup = dedup.duplicates(hashes, dedup.load_index(layout, exclude=source))
        if dup.any():
            mask = pa.array(dup)
            gone = kept.filter(mask)
            gone = gone.append_column("filter", pa.array(["dedup_url_caption"] * len(gone)))
            removed = pa.concat_tables([removed, gone])
            counts["dedup_url_caption"] = int(dup.sum())
            kept = kept.filter(pc.invert(mask))
        dedup.record_source(layout, source, hashes[~dup])
    return kept, removed, counts, pf.notes


def _first_plan(
    layout: StorageLayout, source: str, table: pa.Table, cfg: IngestConfig, url_list: str
) -> None:
    """Filter the list once and commit the rows kept, the rows removed and ``_plan.json``."""
    kept, removed, counts, notes = _filter_rows(layout, source, table, cfg, url_list)
    write_parquet(layout.prefiltered_rows(source), removed)
    write_parquet(layout.ingest_rows(source), kept)
    plan = {
        "num_rows": kept.num_rows,
        "samples_per_shard": cfg.samples_per_shard,
        "list_rows": table.num_rows,
        "filtered_before_download": counts,
        "notes": notes,
    }
    write_json(layout.ingest_plan(source), plan)  # last: the commit of the plan


def plan_source(layout: StorageLayout, url_list: str, cfg: IngestConfig) -> SourcePlan:
    """Read and check a list; at first sight filter it and fix its split; write missing inputs.

    The rows kept and the split are fixed the first time (``_plan.json`` is written last, as the
    commit), by the one writer holding the source's plan lease: later filter settings, sources or
    concurrent runs never change an ingested source's shards.
    """
    table = read_url_list(url_list, cfg)  # bad columns fail here, before any download
    source = source_id(url_list)
    if not exists(layout.source_list(source)):
        write_parquet(layout.source_list(source), table)
    plan_path = layout.ingest_plan(source)
    if not exists(plan_path):
        lease = Lease(layout.lease("images", source, "plan"), f"the first plan of source {source}")
        try:
            with lease.hold(wait_s=PLAN_WAIT_S):
                if not exists(plan_path):  # else another writer planned it while we waited
                    _first_plan(layout, source, table, cfg, url_list)
        except LeaseHeld as e:
            raise RuntimeError(f"source {source}: cannot plan it: {e}") from None
    plan = read_json(plan_path)
    new = {"num_rows": plan["num_rows"], "samples_per_shard": cfg.samples_per_shard}
    if plan["samples_per_shard"] != cfg.samples_per_shard:
        old = {"num_rows": plan["num_rows"], "samples_per_shard": plan["samples_per_shard"]}
        raise ValueError(
            f"source {source} was split with {old}, now {new}: samples_per_shard cannot "
            f"change for an ingested source (see {plan_path})"
        )
    # Plans from before filters existed sliced the whole list.
    rows_path = layout.ingest_rows(source)
    kept = read_parquet(rows_path) if exists(rows_path) else table
    if kept.num_rows != plan["num_rows"]:
        raise ValueError(f"{rows_path}: {kept.num_rows} rows, {plan_path} says {plan['num_rows']}")
    counts = plan.get("filtered_before_download", {})
    total = math.ceil(kept.num_rows / cfg.samples_per_shard)
    done = set(completed_shards(layout, source))
    pending = [s for s in range(total) if s not in done]
    write_shard_inputs(layout, source, kept, pending, cfg.samples_per_shard)
    return SourcePlan(source, kept.num_rows, total, pending, counts)
