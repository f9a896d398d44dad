"""The captioned-shapes data set: determinism, the loopback server, the URL list."""

from __future__ import annotations

import io
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest
from PIL import Image

from unclip.datasets.config import SyntheticConfig
from unclip.datasets.synthetic import (
    render_png,
    sample_spec,
    serve_synthetic,
    shape_caption,
    url_list_port,
    write_url_list,
)

CFG = SyntheticConfig(num_pairs=12, image_size=40, seed=7)


def test_same_seed_same_bytes_and_caption_matches_spec():
    for i in range(CFG.num_pairs):
        assert render_png(CFG, i) == render_png(CFG.model_copy(), i)
        spec = sample_spec(CFG, i)
        assert spec["caption"] == shape_caption(spec["color"], spec["shape"])
        assert spec["color"] in CFG.colors and spec["shape"] in CFG.shapes
    other = CFG.model_copy(update={"seed": 8})
    assert any(render_png(CFG, i) != render_png(other, i) for i in range(CFG.num_pairs))


def test_captions_take_the_article_their_colour_sounds_with():
    assert shape_caption("orange", "triangle") == "an orange triangle"
    assert shape_caption("red", "circle") == "a red circle"
    assert shape_caption("Indigo", "square") == "an Indigo square"
    # Every default colour, as the generator writes it, over enough samples to draw them all.
    cfg = SyntheticConfig(num_pairs=200, seed=0)
    captions = {sample_spec(cfg, i)["caption"] for i in range(cfg.num_pairs)}
    assert "an orange triangle" in captions and "a red circle" in captions
    assert not [c for c in captions if c.startswith("a orange")]


def test_image_is_rgb_of_configured_size_with_a_shape():
    im = Image.open(io.BytesIO(render_png(CFG, 0)))
    assert im.size == (40, 40) and im.mode == "RGB"
    colors = im.getcolors(maxcolors=4096)
    assert colors is not None and len(colors) >= 2  # background and shape


def test_out_of_range_index_raises():
    with pytest.raises(IndexError):
        sample_spec(CFG, CFG.num_pairs)


def test_server_serves_on_loopback_and_404s_out_of_range():
    with serve_synthetic(CFG) as base:
        assert base.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{base}/3.png", timeout=5) as r:
            assert r.headers["Content-Type"] == "image/png"
            assert r.read() == render_png(CFG, 3)
        for bad in (f"{base}/{CFG.num_pairs}.png", f"{base}/x.png", f"{base}/"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(bad, timeout=5)
            assert e.value.code == 404
    with pytest.raises(urllib.error.URLError):  # stopped on exit
        urllib.request.urlopen(f"{base}/0.png", timeout=2)


def test_url_list_columns_and_port(tmp_path):
    path = str(tmp_path / "list.parquet")
    assert url_list_port(path) is None
    write_url_list(CFG, "http://127.0.0.1:4567", path)
    t = pq.read_table(path)
    assert t.column_names == ["url", "caption", "color", "shape"]
    assert t.num_rows == CFG.num_pairs
    assert t.column("url")[5].as_py() == "http://127.0.0.1:4567/5.png"
    assert t.column("caption")[5].as_py() == sample_spec(CFG, 5)["caption"]
    assert url_list_port(path) == 4567
    first = open(path, "rb").read()
    write_url_list(CFG, "http://127.0.0.1:4567", path)
    assert open(path, "rb").read() == first  # same list, same bytes: same source id
    assert [p.name for p in tmp_path.iterdir()] == ["list.parquet"]  # no temporaries left
