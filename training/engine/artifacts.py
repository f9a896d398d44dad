"""Moving exported folders between a worker's disk and the storage root (local path or fsspec URI)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

from fsspec.core import url_to_fs

from unclip.datasets.storage import write_json


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def publish_dir(local_dir: str, target: str, marker_name: str, marker: dict[str, Any]) -> None:
    """Copy ``local_dir`` to ``target`` through a temporary sibling; ``marker_name`` is written last.

    Readers treat ``target`` as complete only once the marker exists, which also covers object
    stores where a folder cannot be renamed atomically.
    """
    fs, path = url_to_fs(target)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    if is_local(target):
        shutil.copytree(local_dir, tmp)
        if os.path.exists(path):  # an export interrupted before its marker: replace it
            shutil.rmtree(path)
        os.rename(tmp, path)
    else:
        fs.put(local_dir.rstrip("/") + "/", tmp, recursive=True)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.mv(tmp, path, recursive=True)
    write_json(f"{target.rstrip('/')}/{marker_name}", marker)


@contextlib.contextmanager
def local_dir(path: str) -> Iterator[str]:
    """A local folder with the contents of ``path`` (a remote one is copied to a temp dir)."""
    if is_local(path):
        yield url_to_fs(path)[1]
        return
    fs, p = url_to_fs(path)
    tmp = tempfile.mkdtemp(prefix="unclip-export-")
    try:
        fs.get(p.rstrip("/") + "/", tmp + "/", recursive=True)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
