"""Fixtures for unclip.datasets: tiny configs and a storage root with ingested, embedded shapes.

``shapes_store`` is built once per session without Ray (the shard function and the embedding
function are plain functions; Ray only schedules them), and each test gets its own copy.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import TINY_CLIP

from unclip.datasets import clip as clip_mod
from unclip.datasets.config import ClipConfig, IngestConfig, SyntheticConfig
from unclip.datasets.embed import embed_shard
from unclip.datasets.ingest import download_shard
from unclip.datasets.source_plan import plan_source
from unclip.datasets.storage import StorageLayout
from unclip.datasets.synthetic import serve_synthetic, write_url_list


@pytest.fixture
def tiny_clip_cfg() -> ClipConfig:
    return TINY_CLIP


def ingest_cfg(**kw) -> IngestConfig:
    base = {
        "samples_per_shard": 20,
        "thread_count": 4,
        "timeout_s": 5.0,
        "allow_private_networks": True,
        "shard_retries": 0,
    }
    return IngestConfig(**{**base, **kw})


@dataclass
class Store:
    root: Path
    layout: StorageLayout
    source: str
    clip_checkpoint: str
    clip_id: str
    shards: list[int]


def ingest_without_ray(layout: StorageLayout, url_list: str, cfg: IngestConfig) -> str:
    plan = plan_source(layout, url_list, cfg)
    for shard in plan.pending:
        download_shard(layout.root, plan.source_id, shard, cfg)
    return plan.source_id


@pytest.fixture(scope="session")
def _shapes_store_base(tmp_path_factory) -> Store:
    root = tmp_path_factory.mktemp("shapes_store")
    layout = StorageLayout(str(root))
    syn = SyntheticConfig(num_pairs=40, image_size=48, seed=3)
    url_list = str(root / "lists" / "shapes.parquet")
    with serve_synthetic(syn) as base:
        write_url_list(syn, base, url_list)
        source = ingest_without_ray(layout, url_list, ingest_cfg(image_size=32))
    torch.manual_seed(0)
    ckpt = clip_mod.save_clip(
        clip_mod.build_bootstrap_clip(TINY_CLIP), TINY_CLIP, str(root / "clip" / "bootstrap")
    )
    bundle = clip_mod.load_clip(TINY_CLIP, ckpt)
    for shard in (0, 1):
        embed_shard(layout, bundle, source, shard, batch_size=16)
    return Store(root, layout, source, ckpt, bundle.clip_id, [0, 1])


@pytest.fixture
def shapes_store(_shapes_store_base: Store, tmp_path: Path) -> Store:
    """A private copy of a root with 1 source, 2 shards of 20 shapes (32 px), tiny-CLIP embeddings."""
    root = tmp_path / "store"
    shutil.copytree(_shapes_store_base.root, root)
    base = _shapes_store_base
    return Store(
        root,
        StorageLayout(str(root)),
        base.source,
        str(root / "clip" / "bootstrap"),
        base.clip_id,
        base.shards,
    )


# --- a loopback server of bad responses (tests/datasets/test_bad_input.py, test_netguard.py) ---


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def ok_image(i: int, size: int = 48) -> Image.Image:
    """An opaque gradient, distinct per ``i`` (its bytes are written into the first pixels)."""
    x = np.linspace(0, 255, size, dtype=np.float32)
    r = np.tile(x, (size, 1))
    a = np.stack([r, np.full((size, size), 128, np.float32), r.T], -1).astype(np.uint8)
    a.reshape(-1)[:4] = list(i.to_bytes(4, "big"))
    return Image.fromarray(a)


def rgba_image() -> Image.Image:
    """Left half opaque red, right half fully transparent (blue under alpha 0)."""
    a = np.zeros((48, 48, 4), np.uint8)
    a[:, :24] = (255, 0, 0, 255)
    a[:, 24:] = (0, 0, 255, 0)
    return Image.fromarray(a, "RGBA")


def palette_image() -> Image.Image:
    """Palette PNG: index 0 transparent, index 1 green; top half transparent, bottom green."""
    p = Image.new("P", (48, 48), 1)
    p.putpalette([0, 0, 255, 0, 200, 0] + [0] * 762)
    p.paste(0, (0, 0, 48, 24))
    p.info["transparency"] = 0
    return p


def bomb_png(side: int = 20000) -> bytes:
    """A ~100-byte PNG whose header claims side × side RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


class BadServer:
    """Routes of bad (and some good) responses; ``hits`` counts requests per path."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.stopping = threading.Event()
        self.flaky_failures = 1  # /flaky/* answer 500 this many times per path, then the image
        jpg = jpeg_bytes(ok_image(7, 96))
        self.static: dict[str, tuple[str, bytes, dict[str, str]]] = {
            "/notimage.png": ("image/png", b"<html>not an image</html>", {}),
            "/truncated.jpg": ("image/jpeg", jpg[: len(jpg) // 2], {}),
            "/corrupt.jpg": ("image/jpeg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8, {}),
            "/rgba.png": ("image/png", png_bytes(rgba_image()), {}),
            "/palette.png": ("image/png", png_bytes(palette_image()), {}),
            "/bomb.png": ("image/png", bomb_png(), {}),
            "/noai.png": ("image/png", png_bytes(ok_image(90)), {"X-Robots-Tag": "noai"}),
            "/tiny.png": ("image/png", png_bytes(ok_image(91, 4)), {}),
            "/wide.png": ("image/png", png_bytes(ok_image(92).resize((240, 24))), {}),
            "/same-a.png": ("image/png", png_bytes(ok_image(93)), {}),
            "/same-b.png": ("image/png", png_bytes(ok_image(93)), {}),
            "/big.png": ("image/png", png_bytes(Image.effect_noise((256, 256), 64)), {}),
        }

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        path = unquote(urlsplit(h.path).path)
        self.hits[path] += 1
        if path in self.static:
            ctype, body, headers = self.static[path]
            return self._send(h, 200, body, ctype, headers)
        if path.startswith("/ok/") or path.startswith("/flaky/"):
            if path.startswith("/flaky/") and self.hits[path] <= self.flaky_failures:
                return self._send(h, 500, b"try later", "text/plain")
            return self._send(h, 200, png_bytes(ok_image(zlib.crc32(path.encode()))), "image/png")
        if path == "/404.png":
            return self._send(h, 404, b"no", "text/plain")
        if path == "/500.png":
            return self._send(h, 500, b"oops", "text/plain")
        if path == "/loop.png":
            return self._send(h, 302, b"", "text/plain", {"Location": "/loop.png"})
        if path.startswith("/hops/"):  # /hops/N.png redirects N times, then an image
            n = int(path.split("/")[-1][:-4])
            target = f"/hops/{n - 1}.png" if n > 1 else "/ok/5.png"
            return self._send(h, 302, b"", "text/plain", {"Location": target})
        if path == "/stall.png":  # headers and 1 KB of a 100 KB body, then nothing
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.send_header("Content-Length", "100000")
            h.end_headers()
            h.wfile.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 1000)
            h.wfile.flush()
            self.stopping.wait(60)
            return None
        if path.startswith("/slow/"):  # the image, after 1 s
            self.stopping.wait(1.0)
            return self._send(h, 200, png_bytes(ok_image(zlib.crc32(path.encode()))), "image/png")
        if path.startswith("/hang/"):  # accepts, reads the request, never answers
            self.stopping.wait(60)
            return None
        if path in ("/slow-headers.png", "/continue.png", "/slow-status.png"):
            return self._drip_head(h, path)
        if path in ("/endless.png", "/drip.png"):  # no length; fast stream, or 16 bytes / 0.2 s
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.end_headers()
            fast = path == "/endless.png"
            chunk = b"\x00" * (1 << 16 if fast else 16)
            try:
                while not self.stopping.is_set():
                    h.wfile.write(chunk)
                    h.wfile.flush()
                    if not fast:
                        self.stopping.wait(0.2)
            except OSError:
                pass  # the client gave up: what the limits are for
            return None
        return self._send(h, 404, b"no route", "text/plain")

    def _drip_head(self, h: BaseHTTPRequestHandler, path: str) -> None:
        """Never finish the head: a header line, a ``100 Continue`` or a status byte every 0.2 s."""
        if path == "/slow-headers.png":
            first, unit = b"HTTP/1.1 200 OK\r\n", b"X-Slow: 1\r\n"
        elif path == "/continue.png":
            first, unit = b"", b"HTTP/1.1 100 Continue\r\n\r\n"
        else:
            first, unit = b"HTTP/1.1 ", b"2"
        try:
            h.wfile.write(first)
            while not self.stopping.is_set():
                h.wfile.write(unit)
                h.wfile.flush()
                self.stopping.wait(0.2)
        except OSError:
            pass  # the client gave up: what the deadline is for

    @staticmethod
    def _send(h, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)


@contextlib.contextmanager
def serve_bad() -> Iterator[tuple[str, BadServer]]:
    """Start a :class:`BadServer` on 127.0.0.1; yields (base URL, server state)."""
    state = BadServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            state.handle(self)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        state.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def bad_server() -> Iterator[tuple[str, BadServer]]:
    with serve_bad() as s:
        yield s
