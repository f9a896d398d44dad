"""The captioned-shapes demo data set: deterministic images + captions, a URL list, a loopback server.

Sample ``i`` of seed ``s`` is drawn from its own RNG seeded by ``(s, i)``, so any sample can be
rendered alone (the server renders on request) and the same config gives byte-identical PNGs.
"""

from __future__ import annotations

import contextlib
import io
import random
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from PIL import Image, ImageColor, ImageDraw

from .config import SyntheticConfig
from .storage import atomic_write

# Saturated, well-separated colours for the default names; other names go through PIL's table.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
_PATH = re.compile(r"^/(\d+)\.png$")


def _rgb(color: str) -> tuple[int, int, int]:
    if color in PALETTE:
        return PALETTE[color]
    try:
        return ImageColor.getrgb(color)[:3]
    except ValueError as e:
        raise ValueError(f"synthetic.colors: unknown colour {color!r}") from e


def color_palette(cfg: SyntheticConfig) -> dict[str, tuple[int, int, int]]:
    """Colour name → RGB of the shapes drawn, for the cascade's attribute check."""
    return {c: _rgb(c) for c in cfg.colors}


def shape_caption(color: str, shape: str) -> str:
    """The caption of one coloured shape, with the article its colour takes: "an orange triangle"."""
    # The article follows the sound of the next word; for colour names its first letter says it.
    article = "an" if color[:1].lower() in ("a", "e", "i", "o", "u") else "a"
    return f"{article} {color} {shape}"


def sample_spec(cfg: SyntheticConfig, index: int) -> dict[str, Any]:
    """Colour, shape, caption and geometry of sample ``index`` (deterministic in seed and index)."""
    if not 0 <= index < cfg.num_pairs:
        raise IndexError(f"synthetic sample {index} out of range [0, {cfg.num_pairs})")
    bad = [s for s in cfg.shapes if s not in SHAPES]
    if bad:
        raise ValueError(f"synthetic.shapes: unknown shapes {bad}; use {list(SHAPES)}")
    if cfg.compositional is not None:
        from .compositional import compositional_spec

        return compositional_spec(cfg, index)
    rng = random.Random(f"unclip-synthetic:{cfg.seed}:{index}")
    color = rng.choice(cfg.colors)
    shape = rng.choice(cfg.shapes)
    n = cfg.image_size
    size = rng.uniform(0.35, 0.7) * n  # side of the shape's bounding box
    half = size / 2
    cx = rng.uniform(half + 1, n - half - 1)
    cy = rng.uniform(half + 1, n - half - 1)
    background = tuple(rng.randint(232, 255) for _ in range(3))
    return {
        "index": index,
        "color": color,
        "shape": shape,
        "caption": shape_caption(color, shape),
        "geometry": {"cx": cx, "cy": cy, "size": size, "background": background},
    }


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, fill: Any
) -> None:
    """One shape of side ``size`` centred at (cx, cy): circle, square or upright triangle."""
    x0, y0 = cx - size / 2, cy - size / 2
    x1, y1 = x0 + size, y0 + size
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)


def render_image(cfg: SyntheticConfig, index: int) -> Image.Image:
    """Sample ``index`` as a PIL RGB image."""
    return render_spec(cfg, sample_spec(cfg, index))


def render_spec(cfg: SyntheticConfig, spec: dict[str, Any]) -> Image.Image:
    """A sample's spec (``sample_spec``'s, or one built like it) as a PIL RGB image."""
    n = cfg.image_size
    if "objects" in spec:  # the compositional set
        image = Image.new("RGB", (n, n), spec["background"])
        draw = ImageDraw.Draw(image)
        for o in spec["objects"]:
            draw_shape(draw, o["shape"], o["cx"], o["cy"], o["size"], _rgb(o["color"]))
        return image
    g = spec["geometry"]
    image = Image.new("RGB", (n, n), g["background"])
    draw_shape(
        ImageDraw.Draw(image), spec["shape"], g["cx"], g["cy"], g["size"], _rgb(spec["color"])
    )
    return image


def render_png(cfg: SyntheticConfig, index: int) -> bytes:
    """Sample ``index`` as PNG bytes, byte-identical for the same config and index."""
    buf = io.BytesIO()
    render_image(cfg, index).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _handler(cfg: SyntheticConfig) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            m = _PATH.match(urlsplit(self.path).path)
            index = int(m.group(1)) if m else -1
            if not 0 <= index < cfg.num_pairs:
                self.send_error(404, "no such sample")
                return
            body = render_png(cfg, index)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # thousands of requests per ingest; errors show up as failed rows instead

    return Handler


@contextlib.contextmanager
def serve_synthetic(cfg: SyntheticConfig, port: int = 0) -> Iterator[str]:
    """Serve ``/{index}.png`` on 127.0.0.1 (port 0 = any free port); yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(cfg))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="synthetic-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def url_list_table(cfg: SyntheticConfig, base_url: str) -> pa.Table:
    """The URL list of the data set as a table: url, caption, color, shape."""
    specs = [sample_spec(cfg, i) for i in range(cfg.num_pairs)]
    base = base_url.rstrip("/")
    return pa.table(
        {
            "url": [f"{base}/{s['index']}.png" for s in specs],
            "caption": [s["caption"] for s in specs],
            "color": [s["color"] for s in specs],
            "shape": [s["shape"] for s in specs],
        }
    )


def write_url_list(cfg: SyntheticConfig, base_url: str, path: str) -> None:
    """Write the URL list as Parquet at ``path`` (fsspec), atomically."""
    with atomic_write(path) as f:
        pq.write_table(url_list_table(cfg, base_url), f)


def url_list_port(path: str) -> int | None:
    """The port of the loopback server an existing list points at (None if no list)."""
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        return None
    with fs.open(p, "rb") as f:
        urls = pq.read_table(f, columns=["url"]).column("url")
    if len(urls) == 0:
        return None
    return urlsplit(urls[0].as_py()).port
