"""Writer leases on a storage root: at most one live holder per name, on local disks and object stores.

A lease is a folder of generation records under the storage root (``StorageLayout.lease``):
``{uri}/{generation:012d}.json``, each ``{"holder", "host", "pid", "what", "acquired",
"expires", "released"}``. The newest generation says who holds the lease. To acquire, a writer
reads it; when it is released, expired, or its own, the writer creates the next generation
with an *exclusive create* (``os.link`` on a local disk, ``If-None-Match: *`` through fsspec's
``"xb"`` mode on S3 / GCS / memory), which exactly one contender wins. The holder renews its
record every ``ttl_s / 3`` from a heartbeat thread; a holder that stops renewing (killed,
partitioned) loses the lease ``ttl_s`` after its last renewal, and the next writer takes over.
A holder on the same host whose process is gone has lost it at once, so a rerun after a
killed run starts without waiting out the TTL.

API::

    lease = Lease(layout.lease("writer"), what="unclip run c.yaml", ttl_s=60)
    with lease.hold(wait_s=0):          # LeaseHeld (naming the holder) if someone else has it
        ...                             # work; before each commit:
        lease.ensure()                  # LeaseLost if a renewal failed or another took over
    Lease.current(uri)                  # who holds it now (a Holder), or None

``wait_s`` > 0 polls until the lease is free or the time is up; ``wait_s=None`` waits forever.
Expiry compares wall clocks of different machines: keep them in sync (NTP) and the TTL well
above their skew. A filesystem without exclusive create raises :class:`LeaseUnsupported`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from .storage import fsync_dir


class LeaseHeld(RuntimeError):
    """Another live writer holds the lease; the message names it."""


class LeaseLost(RuntimeError):
    """This writer's lease expired or was taken over: it must not commit."""


class LeaseUnsupported(RuntimeError):
    """The storage cannot create a file exclusively, which leases need."""


@dataclass(frozen=True)
class Holder:
    """One generation's record: who holds (or held) the lease, until when."""

    holder: str
    host: str
    pid: int
    what: str
    acquired: float
    expires: float
    released: bool = False

    def live(self, now: float | None = None) -> bool:
        """Still held: not released, not expired, and not by a process of this host that died
        (a killed run's lease is free at once for a rerun on the same machine)."""
        if self.released or self.expires <= (time.time() if now is None else now):
            return False
        return self.host != socket.gethostname() or _pid_alive(self.pid)

    def describe(self) -> str:
        """One line naming the holder, for errors and logs."""
        left = self.expires - time.time()
        return (
            f"{self.what or 'a writer'} (holder {self.holder}, host {self.host}, pid {self.pid}, "
            f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.acquired))}, "
            f"expires in {left:.0f} s unless renewed)"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _generations(uri: str) -> list[int]:
    fs, root = url_to_fs(uri)
    with contextlib.suppress(Exception):
        fs.invalidate_cache(root)  # object-store listings are cached: the newest is what counts
    if not fs.exists(root):
        return []
    out = []
    for p in fs.ls(root, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".json") and name[:-5].isdigit():
            out.append(int(name[:-5]))
    return sorted(out)


def _path(uri: str, gen: int) -> str:
    return f"{uri.rstrip('/')}/{gen:012d}.json"


def _read(uri: str, gen: int) -> Holder | None:
    fs, p = url_to_fs(_path(uri, gen))
    try:
        with fs.open(p, "rb") as f:
            return Holder(**json.loads(f.read()))
    except FileNotFoundError:
        return None  # cleaned up by a newer holder


def _create_exclusive(path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; True if this call created it."""
    fs, p = url_to_fs(path)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(p), exist_ok=True)
        tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(
                tmp, p
            )  # atomic, and fails when p exists: the record appears whole or not at all
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        fsync_dir(os.path.dirname(p))
        return True
    fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    try:
        with fs.open(p, "xb") as f:
            f.write(data)
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError, TypeError) as e:
        raise LeaseUnsupported(
            f"{path}: {type(fs).__name__} cannot create a file exclusively, which writer leases "
            f"need ({e})"
        ) from e
    return True


def _overwrite(path: str, data: bytes) -> None:
    fs, p = url_to_fs(path)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        return
    with fs.open(p, "wb") as f:
        f.write(data)


class Lease:
    """A lease on ``uri`` (a folder under the storage root); see the module docstring."""

    def __init__(self, uri: str, what: str = "", ttl_s: float = 60.0) -> None:
        self.uri = uri.rstrip("/")
        self.what = what
        self.ttl_s = ttl_s
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.generation: int | None = None
        self._renewed = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @staticmethod
    def current(uri: str) -> Holder | None:
        """The live holder of the lease at ``uri``, or None when it is free."""
        gens = _generations(uri)
        rec = _read(uri, gens[-1]) if gens else None
        return rec if rec is not None and rec.live() else None

    def _record(self, now: float, released: bool = False) -> bytes:
        rec = Holder(
            self.holder, socket.gethostname(), os.getpid(), self.what, now, now + self.ttl_s
        )
        if released:
            rec = Holder(**{**asdict(rec), "expires": now, "released": True})
        return json.dumps(asdict(rec)).encode()

    def try_acquire(self) -> Holder | None:
        """Take the lease if it is free; returns None on success, else the live holder."""
        while True:
            gens = _generations(self.uri)
            top = gens[-1] if gens else 0
            rec = _read(self.uri, top) if gens else None
            if rec is not None and rec.live() and rec.holder != self.holder:
                return rec
            now = time.time()
            if _create_exclusive(_path(self.uri, top + 1), self._record(now)):
                self.generation, self._renewed, self._lost = top + 1, now, None
                for old in gens:  # history nobody needs: only the newest generation counts
                    with contextlib.suppress(Exception):
                        fs, p = url_to_fs(_path(self.uri, old))
                        fs.rm(p)
                return None
            # another writer created that generation first: look again

    def acquire(self, wait_s: float | None = 0.0, poll_s: float = 1.0) -> Lease:
        """Take the lease, waiting up to ``wait_s`` (None: forever); LeaseHeld names the holder."""
        start = time.monotonic()
        while True:
            held = self.try_acquire()
            if held is None:
                return self
            if wait_s is not None and time.monotonic() - start >= wait_s:
                waited = f" after waiting {wait_s:g} s" if wait_s else ""
                raise LeaseHeld(f"{self.uri} is held by {held.describe()}{waited}")
            time.sleep(poll_s if wait_s is None else min(poll_s, max(wait_s / 4, 0.05)))

    def renew(self) -> None:
        """Extend the lease by ``ttl_s``; LeaseLost if another writer took it over."""
        self.ensure(check_storage=True)
        now = time.time()
        _overwrite(_path(self.uri, self.generation or 0), self._record(now))
        self._renewed = now

    def ensure(self, check_storage: bool = True) -> None:
        """Raise LeaseLost unless this writer still holds the lease (call before each commit)."""
        if self.generation is None:
            raise LeaseLost(f"{self.uri}: not acquired")
        if self._lost:
            raise LeaseLost(self._lost)
        if time.time() - self._renewed > self.ttl_s:
            self._lost = f"{self.uri}: not renewed for more than {self.ttl_s:g} s"
            raise LeaseLost(self._lost)
        if check_storage:
            gens = _generations(self.uri)
            if not gens or gens[-1] != self.generation:
                newest = _read(self.uri, gens[-1]) if gens else None
                by = newest.describe() if newest else "nobody (the record is gone)"
                self._lost = f"{self.uri}: taken over by {by}"
                raise LeaseLost(self._lost)

    def release(self) -> None:
        """Give the lease up (if still held), so the next writer need not wait for expiry."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=self.ttl_s)
            self._beat = None
        if self.generation is None:
            return
        with contextlib.suppress(LeaseLost):
            self.ensure(check_storage=True)
            _overwrite(_path(self.uri, self.generation), self._record(time.time(), True))
        self.generation = None

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLost:
                return
            except Exception as e:  # storage down: ensure() fails once the TTL has passed
                self._lost = None if time.time() - self._renewed < self.ttl_s else str(e)

    @contextlib.contextmanager
    def hold(self, wait_s: float | None = 0.0) -> Iterator[Lease]:
        """Acquire, renew in the background while the block runs, release at the end."""
        self.acquire(wait_s)
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
        self._beat.start()
        try:
            yield self
        finally:
            self.release()
