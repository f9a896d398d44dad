"""Durable commits: on a local disk the bytes, then the rename, reach the disk before we go on."""

from __future__ import annotations

import os
import stat

from unclip.datasets import storage
from unclip.datasets.storage import atomic_write


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(("fsync", kind))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("rename", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    monkeypatch.setattr(storage.os, "replace", replace)
    with atomic_write(str(tmp_path / "a" / "00000.tar")) as f:
        f.write(b"x" * 10240)
    assert events == [("fsync", "file"), ("rename", "00000.tar"), ("fsync", "dir")]
    assert (tmp_path / "a" / "00000.tar").read_bytes() == b"x" * 10240
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["00000.tar"]  # no temporary left


def test_a_failed_write_leaves_no_file_under_the_final_name(tmp_path):
    target = tmp_path / "b.json"
    try:
        with atomic_write(str(target), "w") as f:
            f.write("{")
            raise RuntimeError("killed mid-write")
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []
