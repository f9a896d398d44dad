"""One try of a shard's download, in a child process that the shard task can kill.

img2dataset's ``Downloader`` runs a thread pool whose threads cannot be interrupted: a server
that never answers keeps them (and the pool's ``__exit__``) waiting. So the shard task
(``shard_task.py``) runs each try in a child process and kills it when the try passes
``ingest.shard_deadline_s`` (counted from when the child has loaded its libraries, at most
``STARTUP_S`` later); the process and every thread in it end
for certain, and since the child writes only into the try's local temp folder, nothing partial
reaches the storage root. The child installs the network guard for its whole life
(``netguard.install_for_process``) and exits by itself if its parent dies.

The children fork from a multiprocessing fork server that imported img2dataset once: its
package imports torch (through webdataset), albumentations and OpenCV, about 3 s a process on
2 CPUs, which a fresh interpreter per shard paid again for every shard. The fork server is
started by the first try of a worker process and dies with it; each child is a new process
(nothing of one try's threads or sockets reaches the next).

Protocol: SPEC is a JSON file ``{"input", "out", "shard", "cfg", "phash_index"}``; on success the child writes
``{out}/result.json`` = ``{"stats": ...}`` (img2dataset's stats, filters folded in) beside
img2dataset's ``{shard}.tar`` / ``.parquet`` and exits 0.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import threading
from typing import Any

from .config import IngestConfig
from .netguard import NetPolicy, RequestLimits

SHARD_NAME_DIGITS = 5  # shard names are {shard:05d}, as StorageLayout.image_shard
RESULT = "result.json"
STARTUP_S = 120.0  # the child's imports (img2dataset, OpenCV) before its deadline starts
# Imported once by the fork server, so that each try's child starts with them loaded.
FORK_SERVER_PRELOAD = [
    __name__,
    "img2dataset.downloader",
    "img2dataset.resizer",
    "img2dataset.writer",
    "pyarrow",
]


class ShardError(RuntimeError):
    """A shard task failed as a whole (Ray retries it)."""


class ShardDeadlineExceeded(ShardError):
    """One try of a shard ran past ``ingest.shard_deadline_s`` and was killed."""


def request_limits(cfg: IngestConfig) -> RequestLimits:
    """The per-request limits of ``cfg``."""
    return RequestLimits(cfg.max_redirects, cfg.max_image_bytes, cfg.max_request_time_s)


def net_policy(cfg: IngestConfig) -> NetPolicy:
    """Where the downloads of ``cfg`` may connect."""
    return NetPolicy(cfg.allow_private_networks, tuple(cfg.allowed_networks), cfg.proxy)


def make_downloader(
    cfg: IngestConfig,
    output_folder: str,
    column_list: list[str],
    tally: Any,
    near_duplicates: Any = None,
) -> Any:
    """img2dataset's Downloader with this project's resizer guard and filtering writer (its
    modules are already loaded: the fork server imported them, see ``_fork_context``)."""
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    from .image_filters import GuardedResizer, filtering_writer

    f = cfg.filters
    resizer = Resizer(
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=False,
        encode_quality=cfg.encode_quality,
        encode_format=cfg.encode_format,
        min_image_size=f.min_image_size,
        max_image_area=f.max_image_area,
        max_aspect_ratio=f.max_aspect_ratio or float("inf"),
    )
    return Downloader(
        sample_writer_class=filtering_writer(
            WebDatasetSampleWriter, tally, f.dedup_image_sha256, near_duplicates
        ),
        resizer=GuardedResizer(resizer, f),
        thread_count=cfg.thread_count,
        save_caption=True,
        extract_exif=False,
        output_folder=output_folder,
        column_list=column_list,
        timeout=cfg.timeout_s,
        number_sample_per_shard=cfg.samples_per_shard,
        oom_shard_count=SHARD_NAME_DIGITS,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format=cfg.encode_format,
        retries=cfg.retries,
        user_agent_token=None,
        # X-Robots-Tag opt-outs (img2dataset's defaults unless configured); an empty list honours none.
        disallowed_header_directives=list(cfg.disallowed_header_directives) or None,
    )


def _exit_with_parent() -> None:
    """End this process when the shard task that started it is gone (killed worker).

    Not by watching ``getppid()``: the parent is the fork server, which itself waits for every
    child to close its copy of the server's liveness pipe, so the two would keep each other
    alive. Multiprocessing's parent sentinel is a pipe from the shard task's own process."""
    parent = multiprocessing.parent_process()

    def watch() -> None:
        parent.join()  # returns when the shard task's end of the pipe closes
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(spec_path: str, ready: Any) -> int:
    """The child: download one shard into ``spec["out"]``; 0 when img2dataset finished it.

    ``ready``: the write end of a pipe (a multiprocessing ``Connection``), told when the
    libraries are loaded."""
    _exit_with_parent()
    import pyarrow as pa

    from .image_filters import FilterTally, adjust_stats
    from .netguard import install_for_process

    with open(spec_path) as f:
        spec = json.load(f)
    cfg = IngestConfig.model_validate(spec["cfg"])
    install_for_process(net_policy(cfg), request_limits(cfg))
    with pa.memory_map(spec["input"]) as f:
        column_list = pa.ipc.open_file(f).schema.names
    tally = FilterTally()
    near_duplicates = None
    if spec.get("phash_index") is not None:
        from .perceptual_hash import index_from_table

        with pa.memory_map(spec["phash_index"]) as f:
            earlier = pa.ipc.open_file(f).read_all()
        near_duplicates = index_from_table(cfg.filters.phash_max_distance, earlier)
    downloader = make_downloader(cfg, spec["out"], column_list, tally, near_duplicates)
    ready.send_bytes(b"r")  # imports done: the try's deadline starts now
    ready.close()
    ok, _ = downloader((spec["shard"], spec["input"]))  # img2dataset removes the input when done
    name = f"{spec['shard']:0{SHARD_NAME_DIGITS}d}"
    stats_file = os.path.join(spec["out"], f"{name}_stats.json")
    if not ok or not os.path.exists(stats_file):
        return 1
    with open(stats_file) as f:
        stats = adjust_stats(json.load(f), tally)
    with open(os.path.join(spec["out"], RESULT), "w") as f:
        json.dump({"stats": stats}, f)
    return 0


def _fork_context() -> Any:
    """The fork-server context the tries start from (the server starts on first use)."""
    # img2dataset imports albumentations, which otherwise phones home for updates on import.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FORK_SERVER_PRELOAD)
    return ctx


def _child(spec_path: str, ready: Any) -> None:
    sys.exit(main(spec_path, ready))


def _wait_ready(ready_r: Any, label: str) -> None:
    """Wait until the child has imported its libraries (or died); bounded by STARTUP_S."""
    try:
        if not ready_r.poll(STARTUP_S):
            raise ShardError(f"{label}: the download process did not start within {STARTUP_S:g} s")
        try:
            ready_r.recv_bytes()
        except EOFError:  # the child died first: its exit code tells
            pass
    finally:
        ready_r.close()


def run_try(
    input_path: str,
    out: str,
    shard: int,
    cfg: IngestConfig,
    label: str,
    phash_index: str | None = None,
) -> dict[str, Any]:
    """Run one try in a child process; kill it at the deadline. Returns the shard's stats.

    ``phash_index``: an Arrow file of the source's earlier ``key`` / ``phash`` values that
    near-duplicates are checked against (None: no perceptual dedup).
    """
    spec_path = os.path.join(out, "spec.json")
    spec = {
        "input": input_path,
        "out": out,
        "shard": shard,
        "cfg": cfg.model_dump(mode="json"),
        "phash_index": phash_index,
    }
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    ctx = _fork_context()
    ready_r, ready_w = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(spec_path, ready_w), name=f"shard {label}")
    proc.start()
    ready_w.close()
    try:
        _wait_ready(ready_r, label)
        proc.join(cfg.shard_deadline_s)
    except BaseException:
        proc.kill()
        proc.join()
        raise
    if proc.exitcode is None:  # still running at the deadline
        proc.kill()  # every download thread ends with the process
        proc.join()
        raise ShardDeadlineExceeded(
            f"{label}: shard try ran past its {cfg.shard_deadline_s:g} s deadline and was killed"
        )
    rc = proc.exitcode
    result = os.path.join(out, RESULT)
    if rc != 0 or not os.path.exists(result):
        raise ShardError(f"{label}: img2dataset's downloader failed (exit {rc}; see worker log)")
    with open(result) as f:
        return json.load(f)["stats"]
