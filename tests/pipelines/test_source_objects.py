"""``sources:`` entries as objects: globs, per-source columns, format and metadata filters."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unclip.datasets import url_lists
from unclip.datasets.source_plan import plan_source
from unclip.datasets.storage import StorageLayout
from unclip.pipelines import sources
from unclip.pipelines.config import load_config


def _laion_part(path, first, n, punsafe):
    pq.write_table(
        pa.table(
            {
                "URL": [f"http://127.0.0.1:9/{first + i}.jpg" for i in range(n)],
                "TEXT": [f"photo number {first + i}" for i in range(n)],
                "punsafe": punsafe,
            }
        ),
        path,
    )


@pytest.fixture
def mixed_config(tmp_path):
    """Two LAION-shaped parquet parts by glob, a CC3M-shaped TSV (no header names it would guess)
    without extension, and a plain string source with the default columns."""
    (tmp_path / "laion").mkdir()
    _laion_part(tmp_path / "laion" / "part-00001.parquet", 10, 4, [0.9, 0.1, 0.2, 0.7])
    _laion_part(tmp_path / "laion" / "part-00000.parquet", 0, 3, [0.1, 0.6, 0.3])
    (tmp_path / "laion" / "notes.txt").write_text("not a list")
    (tmp_path / "cc3m.data").write_text(
        "caption_text\timage_url\na dog\thttp://127.0.0.1:9/d.jpg\na cat\thttp://127.0.0.1:9/c.jpg\n"
    )
    pq.write_table(
        pa.table({"url": ["http://127.0.0.1:9/x.jpg"], "caption": ["x"]}),
        tmp_path / "plain.parquet",
    )
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        "storage: out\n"
        "sources:\n"
        "  - path: laion/part-*.parquet\n"
        "    url_col: URL\n"
        "    caption_col: TEXT\n"
        "    metadata: {punsafe: {lt: 0.5}}\n"
        "  - {path: cc3m.data, format: tsv, url_col: image_url, caption_col: caption_text}\n"
        "  - plain.parquet\n"
    )
    return load_config(cfg_file)


def test_a_glob_is_one_source_per_file_with_its_entrys_options(mixed_config, tmp_path):
    lists = sources.configured_lists(mixed_config)
    assert [item.path for item in lists] == [
        str(tmp_path / "laion" / "part-00000.parquet"),
        str(tmp_path / "laion" / "part-00001.parquet"),
        str(tmp_path / "cc3m.data"),
        str(tmp_path / "plain.parquet"),
    ]
    assert lists[0].options == {
        "url_col": "URL",
        "caption_col": "TEXT",
        "metadata": {"punsafe": {"lt": 0.5, "keep_missing": False}},
    }
    assert lists[3].options == {}


def test_registered_sources_keep_stable_ids_and_their_options(mixed_config, tmp_path):
    ids = sources.register_configured(mixed_config)
    assert ids == [
        url_lists.source_id(item.path) for item in sources.configured_lists(mixed_config)
    ]
    assert sources.register_configured(mixed_config) == ids  # idempotent: same partition keys
    assert list(sources.source_lists(mixed_config)) == sorted(ids)
    origin = json.loads((tmp_path / "out" / "sources" / f"{ids[2]}.origin.json").read_text())
    assert origin["options"] == {
        "format": "tsv",
        "url_col": "image_url",
        "caption_col": "caption_text",
    }
    # Each source reads with its own columns and format.
    for sid in ids:
        path = sources.url_list_of(mixed_config, sid)  # as the url_lists asset reads it
        checked = sources.validate(
            path, mixed_config, sources.ingest_config_of(mixed_config, sid, path)
        )
        assert checked.rows == {0: 3, 1: 4, 2: 2, 3: 1}[ids.index(sid)]


def test_a_sources_metadata_filter_and_columns_shape_its_plan(mixed_config, tmp_path):
    sources.register_configured(mixed_config)
    layout = StorageLayout(mixed_config.storage)
    part1 = str(tmp_path / "laion" / "part-00001.parquet")
    sid = url_lists.source_id(part1)
    plan = plan_source(layout, part1, sources.ingest_config_of(mixed_config, sid, part1))
    assert plan.num_rows == 2  # punsafe 0.9 and 0.7 removed before download
    kept = pq.read_table(layout.ingest_rows(sid))
    assert kept.column("caption").to_pylist() == ["photo number 11", "photo number 12"]
    # The plain source keeps the ingest section's columns (url, caption) and no filter.
    plain = str(tmp_path / "plain.parquet")
    assert sources.ingest_config_of(mixed_config, url_lists.source_id(plain), plain) == (
        mixed_config.ingest
    )


def test_a_glob_matching_nothing_names_the_entry(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("storage: out\nsources:\n  - plain.parquet\n  - {path: 'none/*.parquet'}\n")
    with pytest.raises(
        FileNotFoundError, match=r"sources\[1\]: glob .*none/\*\.parquet matches no file"
    ):
        sources.configured_lists(load_config(f))


def test_an_unknown_key_in_a_source_object_is_named(tmp_path):
    from unclip.pipelines.config import ConfigError

    f = tmp_path / "c.yaml"
    f.write_text("storage: out\nsources:\n  - {path: a.parquet, url_column: URL}\n")
    with pytest.raises(ConfigError, match=r"sources\.0\.SourceConfig\.url_column: unknown key"):
        load_config(f)
