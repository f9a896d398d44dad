"""Sources of a run: configured URL lists, the synthetic one, and lists accepted from the inbox.

A source is one URL list, named by the hash of its bytes (``url_lists.source_id``); that id is
the key of its Dagster partition. ``sources/{id}.origin.json`` records where the list lives, so
a partition's run finds its list from the key alone, whichever way the source arrived.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fsspec.core import url_to_fs

from unclip.datasets import synthetic, url_lists
from unclip.datasets.storage import StorageLayout, exists, read_json, write_json
from unclip.pipelines.config import PipelineConfig

ACCEPTED = "_accepted"
REJECTED = "_rejected"
SYNTHETIC_LIST = "urls.parquet"


def synthetic_list_path(cfg: PipelineConfig) -> str:
    """Where the synthetic URL list is written (not under ``incoming/``: that is the inbox)."""
    return StorageLayout(cfg.storage).join("synthetic", SYNTHETIC_LIST)


def configured_lists(cfg: PipelineConfig) -> list[str]:
    """Every URL list of the config: ``sources``, plus the synthetic list when enabled."""
    paths = list(cfg.sources)
    if cfg.synthetic is not None:
        paths.append(synthetic_list_path(cfg))
    if not paths:
        raise ValueError("config has no `sources` and no `synthetic` section: nothing to ingest")
    return paths


def write_synthetic_list(cfg: PipelineConfig) -> None:
    """Write the synthetic URL list once (its server port is fixed by the first write)."""
    if cfg.synthetic is None:
        return
    path = synthetic_list_path(cfg)
    if not exists(path):
        with synthetic.serve_synthetic(cfg.synthetic) as base_url:
            synthetic.write_url_list(cfg.synthetic, base_url, path)


def register_configured(cfg: PipelineConfig) -> list[str]:
    """Write the synthetic list if needed and register every configured list; their ids."""
    write_synthetic_list(cfg)
    for p in cfg.sources:
        if not exists(p):
            raise FileNotFoundError(f"sources: URL list {p} does not exist")
    return [register(cfg, p) for p in configured_lists(cfg)]


def source_lists(cfg: PipelineConfig, only: list[str] | None = None) -> dict[str, str]:
    """Source id → URL list: registered lists plus configured ones not registered yet.

    ``only`` restricts to those ids (one partition's run); an unknown id is an error.
    """
    if only is not None:
        return {sid: url_list_of(cfg, sid) for sid in only}
    known = registered(cfg)
    # A registered list is not hashed again (lists can be large, on S3); `unclip run`
    # re-registers the configured ones, so one edited in place gets its new id there.
    seen = set(known.values())
    for p in configured_lists(cfg):
        if p not in seen and exists(p):
            known.setdefault(url_lists.source_id(p), p)
    return dict(sorted(known.items()))


@contextlib.contextmanager
def serving_images(cfg: PipelineConfig, url_list: str) -> Iterator[None]:
    """Serve the synthetic images on the list's own port while its shards download."""
    if cfg.synthetic is None or url_list != synthetic_list_path(cfg):
        yield
        return
    with synthetic.serve_synthetic(cfg.synthetic, port=synthetic.url_list_port(url_list) or 0):
        yield


def incoming_uri(cfg: PipelineConfig) -> str:
    """The inbox the sensor watches: ``sensor.incoming``, else ``<storage>/incoming``."""
    return (cfg.sensor.incoming or StorageLayout(cfg.storage).join("incoming")).rstrip("/")


def register(cfg: PipelineConfig, url_list: str) -> str:
    """Record ``url_list`` as a source of this storage root; returns its id (idempotent)."""
    layout = StorageLayout(cfg.storage)
    sid = url_lists.source_id(url_list)
    path = layout.source_origin(sid)
    if not exists(path) or read_json(path).get("url_list") != url_list:
        write_json(path, {"source": sid, "url_list": url_list, "registered": time.time()})
    return sid


def registered(cfg: PipelineConfig) -> dict[str, str]:
    """Every registered source: id → URL list."""
    layout = StorageLayout(cfg.storage)
    fs, root = url_to_fs(layout.sources_dir())
    if not fs.exists(root):
        return {}
    out = {}
    for p in sorted(fs.glob(f"{root}/*.origin.json")):
        record = read_json(layout.join("sources", p.rsplit("/", 1)[-1]))
        out[record["source"]] = record["url_list"]
    return out


def url_list_of(cfg: PipelineConfig, sid: str) -> str:
    """The URL list of source ``sid``; a clear error when no such source was registered."""
    path = StorageLayout(cfg.storage).source_origin(sid)
    if not exists(path):
        raise KeyError(
            f"source {sid} is not registered under {cfg.storage} ({path} is missing): add its "
            f"URL list to `sources` in the config or drop it into {incoming_uri(cfg)}"
        )
    return read_json(path)["url_list"]


@dataclass
class Checked:
    """A list that reads as ingest will read it: its source id and row count."""

    source_id: str
    rows: int


def validate(url_list: str, cfg: PipelineConfig) -> Checked:
    """Read a list once, as ingest will; any failure is a ValueError naming the problem."""
    try:
        loaded = url_lists.load_url_list(url_list, cfg.ingest)
    except ValueError:
        raise
    except Exception as e:  # a bad file must not take the sensor down: it is a reason to reject
        raise ValueError(
            f"{url_list}: cannot be read as a URL list: {type(e).__name__}: {e}"
        ) from e
    if loaded.table.num_rows == 0:
        raise ValueError(f"{url_list}: the list has no rows")
    return Checked(loaded.source_id, loaded.table.num_rows)


@dataclass
class InboxFile:
    """One candidate list in the inbox and its fingerprint (name, size, mtime)."""

    name: str
    path: str
    fingerprint: str


def inbox_files(cfg: PipelineConfig, now: float | None = None) -> list[InboxFile]:
    """Lists waiting in the inbox: plain files, not hidden, old enough to be complete."""
    uri = incoming_uri(cfg)
    fs, root = url_to_fs(uri)
    fs.invalidate_cache(root)  # object-store listings are cached: moved files must not reappear
    if not fs.exists(root):
        return []
    now = time.time() if now is None else now
    out = []
    for info in fs.ls(root, detail=True):
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if info.get("type") != "file" or name.startswith((".", "_")) or ".tmp" in name:
            continue
        mtime = _mtime(info)
        if mtime is not None and now - mtime < cfg.sensor.min_age_seconds:
            continue
        out.append(InboxFile(name, f"{uri}/{name}", f"{info.get('size')}:{mtime}"))
    return sorted(out, key=lambda f: f.name)


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "updated", "created"):
        v = info.get(key)
        if isinstance(v, (int, float)):
            return float(v)
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
    return None


def accept(cfg: PipelineConfig, f: InboxFile, sid: str) -> str:
    """Move a valid list (source ``sid``) to ``_accepted/{sid}/`` and register it there."""
    dest = f"{incoming_uri(cfg)}/{ACCEPTED}/{sid}/{f.name}"
    _move(f.path, dest)
    return register(cfg, dest)


def reject(cfg: PipelineConfig, f: InboxFile, error: str) -> str:
    """Move a bad list to ``_rejected/`` with ``{name}.error.txt`` saying why; returns its path.

    A name already rejected before gets a numbered sibling (``name~2``), never overwriting it.
    """
    fs, _ = url_to_fs(incoming_uri(cfg))
    dest = f"{incoming_uri(cfg)}/{REJECTED}/{f.name}"
    n = 1
    while fs.exists(url_to_fs(dest)[1]) or fs.exists(url_to_fs(dest + ".error.txt")[1]):
        n += 1
        dest = f"{incoming_uri(cfg)}/{REJECTED}/{f.name}~{n}"
    _move(f.path, dest)
    with fs.open(url_to_fs(dest + ".error.txt")[1], "w") as out:
        out.write(f"{f.name}: rejected by the unclip inbox sensor\n{error}\n")
    return dest


def _move(src: str, dest: str) -> None:
    fs, s = url_to_fs(src)
    d = url_to_fs(dest)[1]
    fs.makedirs(d.rsplit("/", 1)[0], exist_ok=True)
    fs.mv(s, d)
