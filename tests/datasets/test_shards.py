"""Reading webdataset tars: samples, corrupt members, truncated tars, committed shards only."""

from __future__ import annotations

import io
import json
import tarfile

from PIL import Image

from unclip.datasets.shards import ShardReadStats, completed_shards, iter_shard
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


def test_completed_shards_ignores_temporaries(tmp_path):
    layout = StorageLayout(str(tmp_path))
    d = tmp_path / "images" / "src"
    d.mkdir(parents=True)
    for name in ["00000.tar", "00002.tar", "00001.tar.tmp-1234abcd", "00001.parquet", "_plan.json"]:
        (d / name).write_bytes(b"")
    assert completed_shards(layout, "src") == [0, 2]
    assert completed_shards(layout, "missing") == []
