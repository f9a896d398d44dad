"""Reading webdataset tars: samples, corrupt members, truncated tars, committed shards only."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

from unclip.datasets.shards import (
    ShardReadStats,
    _plain_tar_members,
    completed_shards,
    iter_shard,
    shard_committed,
)
from unclip.datasets.storage import StorageLayout


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_iter_shard_reads_samples_and_skips_corrupt_members(tmp_path):
    path = tmp_path / "00000.tar"
    _tar(
        path,
        {
            "001": {"jpg": _png((255, 0, 0)), "txt": b"a red square", "json": b'{"url": "u1"}'},
            "002": {"jpg": b"not an image", "txt": b"broken"},
            "003": {
                "png": _png((0, 0, 255)),
                "txt": "ünï".encode(),
                "json": json.dumps({}).encode(),
            },
            "004": {"txt": b"no image"},
        },
    )
    stats = ShardReadStats()
    samples = list(iter_shard(str(path), stats))
    assert [s.key for s in samples] == ["001", "003"]
    assert samples[0].caption == "a red square" and samples[0].meta == {"url": "u1"}
    assert samples[0].image.mode == "RGB" and samples[0].image.getpixel((0, 0)) == (255, 0, 0)
    assert samples[1].caption == "ünï"
    assert stats.samples == 2 and stats.corrupt == 2 and len(stats.errors) == 2


def test_truncated_tar_is_counted_not_raised(tmp_path):
    path = tmp_path / "00000.tar"
    _tar(path, {f"{i:03d}": {"png": _png((i, i, i)), "txt": b"c"} for i in range(5)})
    with tarfile.open(path) as tar:
        cut = tar.getmember("003.png").offset_data + 10  # in the middle of sample 003's image
    path.write_bytes(path.read_bytes()[:cut])
    stats = ShardReadStats()
    samples = list(iter_shard(str(path), stats))
    assert [s.key for s in samples] == ["000", "001", "002"]
    assert stats.truncated == 1


def _commit(d, shard: int, tar: bytes, parquet: bytes, record_tar: int | None = None) -> None:
    """A shard unit as ingest commits it; ``record_tar`` fakes a record of another try's tar."""
    (d / f"{shard:05d}.parquet").write_bytes(parquet)
    record = {
        "try": f"t{shard}",
        "tar": {"bytes": len(tar) if record_tar is None else record_tar, "sha256": "-"},
        "parquet": {"bytes": len(parquet), "sha256": "-"},
    }
    (d / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 1, "commit": record}))
    (d / f"{shard:05d}.tar").write_bytes(tar)


def test_completed_shards_counts_only_tars_that_match_their_commit_record(tmp_path):
    layout = StorageLayout(str(tmp_path))
    d = tmp_path / "images" / "src"
    d.mkdir(parents=True)
    whole = b"\0" * 10240
    _commit(d, 0, whole, b"PAR1")
    _commit(d, 2, whole, b"PAR1")
    _commit(d, 3, b"", b"PAR1", record_tar=10240)  # zero-length after a power loss
    _commit(d, 4, whole[:5000], b"PAR1", record_tar=10240)  # torn
    _commit(d, 5, whole, b"PAR1", record_tar=20480)  # another try's tar beside this record
    (d / "00001.tar.tmp-1234abcd").write_bytes(whole)  # a killed writer's temporary
    (d / "00006.tar").write_bytes(whole)  # no stats: not a committed unit
    (d / "_plan.json").write_bytes(b"{}")
    assert completed_shards(layout, "src") == [0, 2]
    assert [shard_committed(layout, "src", s) for s in range(7)] == [
        True, False, True, False, False, False, False,
    ]  # fmt: skip
    assert completed_shards(layout, "missing") == []


def _tar_bytes(fmt: int, members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1795489337.4662523  # a float mtime: a pax record
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    return buf.getvalue()


def _tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        return [(i.name, tar.extractfile(i).read()) for i in tar if i.isfile()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_plain_tars_are_split_as_tarfile_splits_them_and_others_go_to_tarfile(tmp_path, fmt):
    members = [
        ("001.jpg", _png((255, 0, 0))),
        ("001.txt", b"a red square"),
        ("dir/" + "d" * 120 + "/002.png", _png((0, 0, 255))),  # ustar: a prefix; GNU: a long name
        ("002.txt", "ünï".encode()),  # pax: a utf-8 path
        ("003.txt", b""),
    ]
    data = _tar_bytes(fmt, members)
    fast = _plain_tar_members(data)
    if fmt == tarfile.GNU_FORMAT:  # GNU long names: tarfile reads it
        assert fast is None
    else:
        assert fast == _tarfile_members(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        inside = [i.offset_data + 1 for i in tar.getmembers() if i.size]
    for cut in (100, 512, *inside):  # truncated in a header or a member: tarfile reads it
        assert _plain_tar_members(data[:cut]) is None
    assert _plain_tar_members(b"") is None
    path = tmp_path / "00000.tar"
    path.write_bytes(data)
    samples = list(iter_shard(str(path)))
    assert [(s.key, s.caption) for s in samples] == [("001", "a red square"), ("002", "ünï")]


def test_plain_tar_with_a_bad_checksum_goes_to_tarfile(tmp_path):
    data = bytearray(_tar_bytes(tarfile.USTAR_FORMAT, [("001.txt", b"x"), ("002.txt", b"y")]))
    data[1024 + 10] ^= 0xFF  # the second header's name
    assert _plain_tar_members(bytes(data)) is None
    assert _tarfile_members(bytes(data)) == [("001.txt", b"x")]  # tarfile stops there
