"""Reading the webdataset tars that ingest writes: ``(key, image, caption, meta)`` per sample.

A shard exists only when its ``.tar`` exists (ingest renames the tar into place last), so
:func:`completed_shards` lists tars and ignores temporaries (``*.tmp-*``) left by a killed writer.
A corrupt member (undecodable image, bad JSON) is counted in :class:`ShardReadStats` and skipped;
a truncated tar ends the shard early and is counted too, never raised.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fsspec.core import url_to_fs
from PIL import Image

from .storage import StorageLayout

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


def completed_shards(layout: StorageLayout, source_id: str) -> list[int]:
    """Shard ids of ``source_id`` whose tar is committed."""
    fs, d = url_to_fs(layout.images_dir(source_id))
    if not fs.exists(d):
        return []
    out = []
    for p in fs.ls(d, detail=False):
        m = _SHARD_TAR.match(p.rstrip("/").rsplit("/", 1)[-1])
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


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


def iter_shard(path: str, stats: ShardReadStats | None = None) -> Iterator[ShardSample]:
    """Samples of one tar in file order; corrupt members are skipped and counted in ``stats``."""
    stats = stats if stats is not None else ShardReadStats()
    fs, p = url_to_fs(path)
    current: str | None = None
    members: dict[str, bytes] = {}

    def flush() -> Iterator[ShardSample]:
        if current is None:
            return
        try:
            sample = _decode(current, members, path)
        except Exception as e:  # a bad sample is data, not a crash
            stats.add_error(f"{path}: {current}: {type(e).__name__}: {e}")
            return
        stats.samples += 1
        yield sample

    with fs.open(p, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    name = info.name.rsplit("/", 1)[-1]
                    if "." not in name:
                        continue
                    key, ext = name.split(".", 1)
                    if key != current:
                        yield from flush()
                        current, members = key, {}
                    fobj = tar.extractfile(info)
                    members[ext.lower()] = fobj.read() if fobj is not None else b""
        except (tarfile.TarError, EOFError, OSError) as e:
            stats.truncated += 1
            stats.errors.append(f"{path}: truncated or corrupt tar: {e}")
            current = None  # the sample being read when the tar broke is incomplete
    yield from flush()
