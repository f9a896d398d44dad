"""Reading the webdataset tars that ingest writes: ``(key, image, caption, meta)`` per sample.

A shard exists only when its ``.tar`` exists (ingest renames the tar into place last) and
matches the commit record in its ``_stats.json`` (sizes of the tar and the Parquet of one try),
so :func:`completed_shards` ignores temporaries (``*.tmp-*``) left by a killed writer, and a
torn, zero-length or mismatched tar counts as missing: ingest redoes it.
A corrupt member (undecodable image, bad JSON) is counted in :class:`ShardReadStats` and skipped;
a truncated tar ends the shard early and is counted too, never raised.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from fsspec.core import url_to_fs
from PIL import Image

from .storage import StorageLayout, atomic_write, write_json

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_SHARD_TAR = re.compile(r"^(\d{5})\.tar$")


@dataclass
class ShardSample:
    key: str
    image: Image.Image  # RGB
    caption: str
    meta: dict[str, Any]


@dataclass
class ShardReadStats:
    """What a read skipped: corrupt samples (with the first few messages) and truncated tars."""

    samples: int = 0
    corrupt: int = 0
    truncated: int = 0
    errors: list[str] = field(default_factory=list)

    def add_error(self, msg: str) -> None:
        self.corrupt += 1
        if len(self.errors) < 20:
            self.errors.append(msg)


def _matches_commit(stats_bytes: bytes | None, tar_size: int, parquet_size: int | None) -> bool:
    """True when the tar and Parquet on storage are the ones the commit record describes."""
    if not stats_bytes:
        return False
    try:
        record = json.loads(stats_bytes).get("commit")
    except (ValueError, AttributeError):
        return False  # a torn stats file: the unit is not committed
    if record is None:  # written before commit records existed: a whole tar is a tar at all
        return tar_size > 0 and tar_size % _BLOCK == 0
    return record["tar"]["bytes"] == tar_size and record["parquet"]["bytes"] == parquet_size


def write_shard_unit(
    layout: StorageLayout, source_id: str, shard: int, tar: bytes, parquet: bytes, stats: dict
) -> None:
    """Commit a shard made in memory as ingest commits one: Parquet, stats with the commit
    record, then the tar (for fixtures and benchmark stores; ingest streams its files)."""

    def digest(data: bytes) -> dict[str, Any]:
        return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    record = {"try": "in-memory", "tar": digest(tar), "parquet": digest(parquet)}
    with atomic_write(layout.image_shard_parquet(source_id, shard)) as f:
        f.write(parquet)
    write_json(layout.image_shard_stats(source_id, shard), {**stats, "commit": record})
    with atomic_write(layout.image_shard(source_id, shard)) as f:
        f.write(tar)


def completed_shards(layout: StorageLayout, source_id: str) -> list[int]:
    """Shard ids of ``source_id`` whose tar is committed and matches its commit record."""
    fs, d = url_to_fs(layout.images_dir(source_id))
    with contextlib.suppress(Exception):
        fs.invalidate_cache(d)
    if not fs.exists(d):
        return []
    sizes = {
        info["name"].rstrip("/").rsplit("/", 1)[-1]: info.get("size")
        for info in fs.ls(d, detail=True)
    }
    tars = {int(m.group(1)): size for name, size in sizes.items() if (m := _SHARD_TAR.match(name))}
    stats_paths = {s: f"{d}/{s:05d}_stats.json" for s in tars if f"{s:05d}_stats.json" in sizes}
    blobs = fs.cat(list(stats_paths.values()), on_error="omit") if stats_paths else {}
    by_name = {p.rstrip("/").rsplit("/", 1)[-1]: b for p, b in blobs.items()}
    return sorted(
        s
        for s, size in tars.items()
        if _matches_commit(by_name.get(f"{s:05d}_stats.json"), size, sizes.get(f"{s:05d}.parquet"))
    )


def shard_committed(layout: StorageLayout, source_id: str, shard: int) -> bool:
    """True when ``shard`` of ``source_id`` is committed (see :func:`completed_shards`)."""
    fs, tar = url_to_fs(layout.image_shard(source_id, shard))
    with contextlib.suppress(Exception):
        fs.invalidate_cache(tar.rsplit("/", 1)[0])
    if not fs.exists(tar):
        return False
    stats = layout.image_shard_stats(source_id, shard)
    parquet = url_to_fs(layout.image_shard_parquet(source_id, shard))[1]
    try:
        blob = fs.cat_file(url_to_fs(stats)[1])
        parquet_size = fs.size(parquet) if fs.exists(parquet) else None
    except FileNotFoundError:
        return False
    return _matches_commit(blob, fs.size(tar), parquet_size)


def _decode(key: str, members: dict[str, bytes], path: str) -> ShardSample:
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        raise ValueError(f"{path}: sample {key} has no image member")
    with Image.open(io.BytesIO(members[ext])) as im:
        im.load()
        image = im.convert("RGB")
    caption = members.get("txt", b"").decode("utf-8")
    meta = json.loads(members["json"].decode("utf-8")) if "json" in members else {}
    return ShardSample(key=key, image=image, caption=caption, meta=meta)


# Tars up to this size are read whole and split by :func:`_plain_tar_members` (a few
# microseconds per member, where tarfile's header parsing costs ~50-100); larger ones stream
# through tarfile so memory stays bounded.
_WHOLE_TAR_MAX_BYTES = 512 * 2**20
_BLOCK = 512
_REGULAR = (b"0", b"\0")
_PAX_IGNORED = {"mtime", "atime", "ctime", "uid", "gid", "uname", "gname", "comment"}


def _octal(field: bytes) -> int | None:
    """A tar header number (NUL/space-terminated octal), or None when tarfile should judge it."""
    if field[:1] in (b"\x80", b"\xff"):  # base-256 (GNU): left to tarfile
        return None
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        return None


def _pax_records(data: bytes) -> dict[str, str] | None:
    """A pax extended header's records ("LEN key=value\n" ...), or None if malformed."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        if space < 0:
            return None
        try:
            length = int(data[pos:space])
        except ValueError:
            return None
        record = data[space + 1 : pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            return None
        key, value = record[:-1].split(b"=", 1)
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _plain_tar_members(data: bytes) -> list[tuple[str, bytes]] | None:
    """``(name, bytes)`` of every regular file of a plain tar (ustar headers, pax headers with
    only ``path`` / ``size`` / times / owners), in order — what tarfile would give.

    Anything else — GNU long names, global or sparse headers, links, base-256 numbers, a bad
    checksum, a truncated tar, no end-of-archive block — gives None: tarfile then reads the
    same bytes, so such tars behave exactly as before (errors, counts and all).
    """
    members: list[tuple[str, bytes]] = []
    pos, end = 0, len(data)
    pax: dict[str, str] = {}
    while True:
        if pos == end:
            return members if pos > 0 and not pax else None  # tarfile: end of data = end of tar
        if pos + _BLOCK > end:
            return None
        header = data[pos : pos + _BLOCK]
        if header.count(0) == _BLOCK:  # end-of-archive block: tarfile stops here
            return members if not pax else None
        checksum = _octal(header[148:156])
        size = _octal(header[124:136])
        if checksum is None or size is None:
            return None
        if checksum != 256 + sum(header[:148]) + sum(header[156:]):
            return None
        kind = header[156:157]
        start = pos + _BLOCK
        if kind == b"x":
            if pax or start + size > end:
                return None
            records = _pax_records(data[start : start + size])
            if records is None or set(records) - _PAX_IGNORED - {"path", "size"}:
                return None
            pax = records
            pos = start + -(-size // _BLOCK) * _BLOCK
            continue
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if header[257:265] == b"ustar\x0000":
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        if "path" in pax:
            name = pax["path"]
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                return None
        pax = {}
        if kind in _REGULAR and not (kind == b"\0" and name.endswith("/")):
            if start + size > end:
                return None
            members.append((name, data[start : start + size]))
        elif kind not in (b"5", b"\0") or size:  # a directory; anything else is tarfile's
            return None
        pos = start + -(-size // _BLOCK) * _BLOCK


@dataclass
class _TarBroke:
    """The error that ended a tar, and the member being read when it did (if any)."""

    error: BaseException
    member: str | None = None


def _tar_members(f: IO[bytes], size: int | None) -> Iterator[tuple[str, bytes] | _TarBroke]:
    """Regular members of a tar in order, then — if the tar broke — a :class:`_TarBroke`."""
    if size is not None and size <= _WHOLE_TAR_MAX_BYTES:
        try:
            data = f.read()
        except OSError as e:
            yield _TarBroke(e)
            return
        members = _plain_tar_members(data)
        if members is not None:
            yield from members
            return
        f = io.BytesIO(data)  # not plain: tarfile reads the same bytes
    name = None
    try:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                name = info.name
                fobj = tar.extractfile(info)
                yield name, fobj.read() if fobj is not None else b""
                name = None
    except (tarfile.TarError, EOFError, OSError) as e:
        yield _TarBroke(e, name)


def iter_shard_members(
    path: str, stats: ShardReadStats | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` of each sample of one tar in file order, undecoded.

    A truncated or corrupt tar ends the shard early: counted in ``stats``, never raised; the
    sample being read when it broke is left out. A missing tar is a ``FileNotFoundError``.
    """
    stats = stats if stats is not None else ShardReadStats()
    fs, p = url_to_fs(path)
    current: str | None = None
    members: dict[str, bytes] = {}
    with fs.open(p, "rb") as f:
        size = getattr(f, "size", None)
        if not isinstance(size, int):
            try:
                size = int(fs.size(p))
            except (OSError, TypeError, ValueError):  # unknown: streamed through tarfile
                size = None
        for member in _tar_members(f, size):
            name = (member.member if isinstance(member, _TarBroke) else member[0]) or ""
            name = name.rsplit("/", 1)[-1]
            key, ext = name.split(".", 1) if "." in name else (None, "")
            if key is not None and key != current:
                if current is not None:
                    yield current, members  # the previous sample is complete
                current, members = key, {}
            if isinstance(member, _TarBroke):
                stats.truncated += 1
                stats.errors.append(f"{path}: truncated or corrupt tar: {member.error}")
                current = None  # the sample being read when the tar broke is incomplete
                break
            if key is not None:
                members[ext.lower()] = member[1]
    if current is not None:
        yield current, members


def decode_sample(key: str, members: dict[str, bytes], path: str) -> ShardSample:
    """One sample's members decoded: the image as RGB, the caption, the metadata."""
    return _decode(key, members, path)


def iter_shard(path: str, stats: ShardReadStats | None = None) -> Iterator[ShardSample]:
    """Samples of one tar in file order; corrupt members are skipped and counted in ``stats``."""
    stats = stats if stats is not None else ShardReadStats()
    for key, members in iter_shard_members(path, stats):
        try:
            sample = _decode(key, members, path)
        except Exception as e:  # a bad sample is data, not a crash
            stats.add_error(f"{path}: {key}: {type(e).__name__}: {e}")
            continue
        stats.samples += 1
        yield sample
