"""The model registry ``registry/{model}.json``: read it, and replace it only as a compare-and-swap.

Two promotions of one model may run at once (two ``unclip run`` on one storage root, a schedule
beside a manual run). Each reads the record, decides, and then swaps in its candidate only if
the record is still the one it decided against; otherwise it decides again. The swap itself
holds ``registry/{model}.lock``, a file created exclusively (``O_EXCL`` on local disks, the
``xb`` mode of fsspec: conditional writes on object stores that support them). A lock older
than ``stale_s`` is taken to be left by a killed process and broken.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fsspec.core import url_to_fs

from unclip.datasets.storage import StorageLayout, write_json

LOCK_TIMEOUT_S = 120.0
LOCK_STALE_S = 600.0


class RegistryBusy(TimeoutError):
    """Another process held the registry lock for longer than the caller would wait."""


def lock_path(layout: StorageLayout, model: str) -> str:
    """The lock file that serialises swaps of ``model``'s record."""
    return layout.join("registry", f"{model}.lock")


def read_record(layout: StorageLayout, model: str) -> tuple[dict[str, Any] | None, str]:
    """The promoted record (None if there is none) and a tag of its exact bytes, for :func:`swap`."""
    fs, p = url_to_fs(layout.registry(model))
    try:
        with fs.open(p, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, "absent"
    return json.loads(data), hashlib.sha256(data).hexdigest()


def swap(layout: StorageLayout, model: str, expected: str, record: dict[str, Any]) -> bool:
    """Write ``record`` if the registry still has the bytes tagged ``expected``; False if not."""
    with hold_lock(layout, model):
        if read_record(layout, model)[1] != expected:
            return False
        write_json(layout.registry(model), record)
        return True


@contextlib.contextmanager
def hold_lock(
    layout: StorageLayout,
    model: str,
    timeout_s: float = LOCK_TIMEOUT_S,
    stale_s: float = LOCK_STALE_S,
) -> Iterator[None]:
    """Hold ``registry/{model}.lock`` (created exclusively) for the block; wait up to ``timeout_s``."""
    path = lock_path(layout, model)
    fs, p = url_to_fs(path)
    fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    token = uuid.uuid4().hex
    holder = {"holder": f"{socket.gethostname()}:{os.getpid()}", "token": token}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with fs.open(p, "xb") as f:
                f.write(json.dumps({**holder, "at": time.time()}).encode())
            break
        except FileExistsError:
            other = _read_lock(fs, p)
            if other is not None and time.time() - float(other.get("at", 0)) > stale_s:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm(p)  # left by a killed process
                continue
            if time.monotonic() > deadline:
                raise RegistryBusy(
                    f"{path} is held by {(other or {}).get('holder', 'another process')} "
                    f"for more than {timeout_s:g} s; if no promotion runs, delete it"
                ) from None
            time.sleep(0.02)
    try:
        yield
    finally:
        mine = _read_lock(fs, p)
        if mine is not None and mine.get("token") == token:
            fs.rm(p)


def _read_lock(fs: Any, p: str) -> dict[str, Any] | None:
    """The lock file's holder record, or None when it vanished or is still being written."""
    try:
        with fs.open(p, "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
