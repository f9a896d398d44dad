"""Pre-download filters: URL validity, caption length / words / script, metadata thresholds.

They run in the driver over the whole list, before it is split into shards, so nothing they
remove is ever fetched. Each row is charged to the first filter that removes it; the removed
rows are kept (with a ``filter`` column naming the reason) so a data team can see what went and
why. (url, caption) dedup lives in ``dedup.py``; image filters run in the shard task
(``image_filters.py``).
"""

from __future__ import annotations

import logging
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .config import FilterConfig, MetadataRule

log = logging.getLogger(__name__)

# What a URL path / query may keep unescaped; everything else (spaces, controls, non-ASCII) is
# percent-encoded, as browsers do. "%" stays so already-encoded URLs are left alone.
_URL_SAFE = "/:@!$&'()*+,;=-._~%"
_QUERY_SAFE = _URL_SAFE + "?"


def normalize_url(url: str | None) -> str | None:
    """The URL with unsafe characters percent-encoded, or None when it is not a usable http(s) URL."""
    if url is None:
        return None
    url = url.strip()
    if not url:
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not host:
        return None
    netloc = parts.netloc
    if not netloc.isascii():
        try:
            netloc = netloc.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if any(c.isspace() for c in netloc):
        return None
    return urlunsplit(
        (
            parts.scheme.lower(),
            netloc,
            quote(parts.path, safe=_URL_SAFE),
            quote(parts.query, safe=_QUERY_SAFE + "="),
            "",  # the fragment never reaches the server
        )
    )


def script_fraction(text: str, scripts: tuple[str, ...]) -> float:
    """Fraction of the letters of ``text`` whose Unicode name starts with one of ``scripts``."""
    letters = hits = 0
    for ch in text:
        if not ch.isalpha():
            continue
        letters += 1
        name = unicodedata.name(ch, "")
        if name.startswith(scripts):
            hits += 1
    return hits / letters if letters else 0.0


@dataclass
class Prefiltered:
    """The rows a list keeps, the rows it lost (with a ``filter`` column), and counts per filter."""

    kept: pa.Table
    removed: pa.Table
    counts: dict[str, int]
    notes: list[str] = field(default_factory=list)


def _metadata_fails(col: pa.ChunkedArray, rule: MetadataRule, name: str, path: str) -> np.ndarray:
    try:
        values = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ValueError(
            f"{path}: column {name!r} (ingest.filters.metadata.{name}) is not numeric: {e}"
        ) from e
    missing = np.isnan(values)
    ok = np.ones(len(values), bool)
    with np.errstate(invalid="ignore"):
        if rule.min is not None:
            ok &= values >= rule.min
        if rule.max is not None:
            ok &= values <= rule.max
        if rule.gt is not None:
            ok &= values > rule.gt
        if rule.lt is not None:
            ok &= values < rule.lt
    return np.where(missing, not rule.keep_missing, ~ok)


def prefilter(table: pa.Table, cfg: FilterConfig, path: str = "<table>") -> Prefiltered:
    """Apply the pre-download filters to a normalized list (``url`` / ``caption`` columns)."""
    n = table.num_rows
    reason = np.full(n, None, dtype=object)
    notes: list[str] = []

    def charge(name: str, fails: np.ndarray) -> None:
        reason[(reason == None) & fails] = name  # noqa: E711 (elementwise)

    urls = [normalize_url(u) for u in table.column("url").to_pylist()]
    charge("invalid_url", np.array([u is None for u in urls], bool))
    table = table.set_column(
        table.schema.get_field_index("url"), "url", pa.array(urls, pa.string())
    )

    captions = pc.fill_null(table.column("caption"), "")
    stripped = pc.utf8_trim_whitespace(captions)
    chars = pc.utf8_length(stripped).to_numpy(zero_copy_only=False)
    char_fails = chars < cfg.caption_min_chars
    if cfg.caption_max_chars is not None:
        char_fails |= chars > cfg.caption_max_chars
    charge("caption_chars", char_fails)
    if cfg.caption_min_words or cfg.caption_max_words is not None:
        words = pc.list_value_length(pc.utf8_split_whitespace(stripped)).to_numpy(
            zero_copy_only=False
        )
        word_fails = words < cfg.caption_min_words
        if cfg.caption_max_words is not None:
            word_fails |= words > cfg.caption_max_words
        charge("caption_words", word_fails)
    if cfg.caption_scripts:
        scripts = tuple(s.upper() for s in cfg.caption_scripts)
        frac = np.array([script_fraction(c, scripts) for c in stripped.to_pylist()])
        charge("caption_script", frac < cfg.caption_min_script_fraction)
    for name, rule in cfg.metadata.items():
        if name not in table.column_names:
            notes.append(f"metadata filter on {name!r} skipped: {path} has no such column")
            continue
        charge(f"metadata:{name}", _metadata_fails(table.column(name), rule, name, path))

    keep = reason == None  # noqa: E711
    removed = table.filter(pa.array(~keep)).append_column(
        "filter", pa.array(reason[~keep].tolist(), pa.string())
    )
    counts = dict(Counter(r for r in reason.tolist() if r is not None))
    for note in notes:
        log.info(note)
    return Prefiltered(table.filter(pa.array(keep)), removed, counts, notes)
