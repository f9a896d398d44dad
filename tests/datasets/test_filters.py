"""Pre-download filters: URL normalisation, caption rules, metadata thresholds."""

from __future__ import annotations

import pyarrow as pa
import pytest

from unclip.datasets.config import FilterConfig, MetadataRule
from unclip.datasets.filters import normalize_url, prefilter, script_fraction


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://h/a.png", "http://h/a.png"),
        ("  HTTPS://h/a b,c.png?x=1 2#frag ", "https://h/a%20b,c.png?x=1%202"),
        ("http://h/%20already.png", "http://h/%20already.png"),
        ("http://h/ü.png", "http://h/%C3%BC.png"),
        ("http://bücher.de/a.png", "http://xn--bcher-kva.de/a.png"),
        ("http://h/a\nb.png", "http://h/ab.png"),  # urlsplit drops tabs and newlines (WHATWG)
        (None, None),
        ("", None),
        ("   ", None),
        ("ftp://h/a.png", None),
        ("file:///etc/passwd", None),
        ("data:image/png;base64,xx", None),
        ("http:///nohost.png", None),
        ("not a url", None),
        ("http://[::1/x", None),
    ],
)
def test_normalize_url(url, expected):
    assert normalize_url(url) == expected


def test_script_fraction():
    assert script_fraction("a red circle", ("LATIN",)) == 1.0
    assert script_fraction("красный круг", ("LATIN",)) == 0.0
    assert script_fraction("赤い丸 red", ("CJK", "HIRAGANA")) == pytest.approx(3 / 6)
    assert script_fraction("123 !!", ("LATIN",)) == 0.0  # no letters at all


def table(**cols):
    n = len(next(iter(cols.values())))
    base = {"url": [f"http://h/{i}.png" for i in range(n)], "caption": ["a photo"] * n}
    return pa.table({**base, **cols})


def test_caption_rules_charge_the_first_failing_filter():
    t = table(caption=["", "  ", "ok caption here", "x" * 50, "one", "красный круг", None])
    cfg = FilterConfig(
        caption_min_chars=2,
        caption_max_chars=40,
        caption_min_words=2,
        caption_scripts=["LATIN"],
        dedup_url_caption=False,
    )
    out = prefilter(t, cfg)
    assert out.kept.column("caption").to_pylist() == ["ok caption here"]
    assert out.counts == {"caption_chars": 4, "caption_words": 1, "caption_script": 1}
    assert out.removed.column("filter").to_pylist() == [
        "caption_chars",
        "caption_chars",
        "caption_chars",
        "caption_words",
        "caption_script",
        "caption_chars",
    ]


def test_metadata_rules():
    t = table(
        punsafe=pa.array([0.1, 0.5, 0.9, None, 0.2], pa.float64()),
        pwatermark=[0.0, 0.0, 0.0, 0.0, 0.95],
        width=[512, 512, 512, 512, 100],
    )
    cfg = FilterConfig(
        metadata={
            "punsafe": MetadataRule(lt=0.5),
            "pwatermark": MetadataRule(max=0.8),
            "width": MetadataRule(min=64),
            "aesthetic": MetadataRule(min=5),  # not in the list: skipped, reported
        }
    )
    out = prefilter(t, cfg, "list.parquet")
    assert out.kept.column("punsafe").to_pylist() == [0.1]
    assert out.counts == {"metadata:punsafe": 3, "metadata:pwatermark": 1}
    assert out.notes == ["metadata filter on 'aesthetic' skipped: list.parquet has no such column"]
    keep = prefilter(t, FilterConfig(metadata={"punsafe": MetadataRule(lt=0.5, keep_missing=True)}))
    assert keep.kept.column("punsafe").to_pylist() == [0.1, None, 0.2]


def test_non_numeric_metadata_column_is_a_clear_error():
    t = table(punsafe=["low", "high"])
    with pytest.raises(
        ValueError, match=r"l.csv: column 'punsafe' \(ingest.filters.metadata.punsafe\)"
    ):
        prefilter(t, FilterConfig(metadata={"punsafe": MetadataRule(lt=0.5)}), "l.csv")


def test_defaults_drop_only_unusable_rows():
    t = table(url=["http://h/a b.png", None, "http://h/c.png"], caption=["a", "b", ""])
    out = prefilter(t, FilterConfig())
    assert out.kept.column("url").to_pylist() == ["http://h/a%20b.png"]
    assert out.counts == {"invalid_url": 1, "caption_chars": 1}
