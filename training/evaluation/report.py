"""The evaluation's self-contained HTML report: metric tables, captioned sample grids, loss curves.

Every image is inlined as a base64 PNG, so ``eval/{run}/report.html`` can be copied or mailed
alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from fsspec.core import url_to_fs
from PIL import Image, ImageDraw, ImageFont

from unclip.datasets.storage import atomic_write, exists


def labelled_grid(
    images: Sequence[np.ndarray],
    labels: Sequence[str],
    cols: int = 8,
    cell: int = 96,
    colors: Sequence[str] | None = None,
) -> Image.Image:
    """Images in rows of ``cols``, each with its label (caption) under it."""
    font = ImageFont.load_default()
    text_h, pad = 26, 4
    rows = max(1, -(-len(images) // cols))
    grid = Image.new(
        "RGB", (cols * (cell + pad) + pad, rows * (cell + text_h + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(grid)
    for i, (x, label) in enumerate(zip(images, labels, strict=True)):
        r, c = divmod(i, cols)
        px, py = pad + c * (cell + pad), pad + r * (cell + text_h + pad)
        grid.paste(
            Image.fromarray(np.asarray(x)).resize((cell, cell), Image.Resampling.NEAREST), (px, py)
        )
        fill = colors[i] if colors else "black"
        for k, line in enumerate(_wrap(label, cell // 6)[:2]):
            draw.text((px, py + cell + 2 + 11 * k), line, fill=fill, font=font)
    return grid


def _wrap(text: str, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    return [*lines, cur] if cur else lines


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def read_bytes(path: str) -> bytes | None:
    """The bytes of a file under the storage root, or None when it is not there."""
    if not exists(path):
        return None
    fs, p = url_to_fs(path)
    with fs.open(p, "rb") as f:
        return f.read()


def _img(data: bytes, alt: str) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return "—" if v is None else str(v)


def table(rows: Mapping[str, Any]) -> str:
    """A two-column HTML table of ``name → value``."""
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in rows.items()
    )
    return f"<table>{body}</table>"


def goals_table(goals: Mapping[str, Mapping[str, Any]]) -> str:
    """The quality goals: value, target, met."""
    mark = {True: "✔ met", False: "✘ missed", None: "n/a"}
    body = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(g['value']))}</td>"
        f"<td>{html.escape(str(g['target']))}</td><td>{mark[g['met']]}</td></tr>"
        for k, g in goals.items()
    )
    return (
        f"<table><tr><th>goal</th><th>value</th><th>target</th><th>status</th></tr>{body}</table>"
    )


STYLE = """
body{font-family:sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:14px}
img{max-width:100%;image-rendering:pixelated;border:1px solid #eee}
"""


def render_html(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """A whole HTML document of ``(heading, html body)`` sections."""
    parts = [f"<h2>{html.escape(h)}</h2>\n{body}" for h, body in sections]
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
        + "\n".join(parts)
        + "</body></html>\n"
    )


def write_report(
    path: str,
    title: str,
    metrics: Mapping[str, Any],
    samples: Mapping[str, Any],
    prior_metrics: Mapping[str, Any] | None,
    loss_curves: Mapping[str, str],
    extra_images: Mapping[str, str],
    max_images: int = 32,
) -> str:
    """Write the report (atomically): decoder goals and metrics, prior metrics, grids, loss curves."""
    sections: list[tuple[str, str]] = []
    scalars = {k: v for k, v in metrics.items() if k not in ("goals", "settings")}
    sections.append(("Quality goals", goals_table(metrics["goals"])))
    sections.append(("Decoder / cascade metrics", table(scalars)))
    sections.append(("Evaluation settings", table(metrics.get("settings", {}))))
    if prior_metrics:
        sections.append(("Prior metrics", table(prior_metrics)))
    n = min(max_images, len(samples["images"]))
    matches = samples.get("matches")
    labels = [
        c if matches is None or matches[i] is None else f"{'ok' if matches[i] else 'x'} {c}"
        for i, c in enumerate(samples["captions"][:n])
    ]
    colors = None
    if matches is not None:
        colors = ["darkgreen" if matches[i] else "firebrick" for i in range(n)]
    grids = [
        (
            "Generated (held-out captions; ok/x and green/red: attribute check)",
            samples["images"][:n],
            labels,
            colors,
        ),
        (
            "Untrained decoder, same captions",
            samples["untrained"][:n],
            samples["captions"][:n],
            None,
        ),
        (
            "Real held-out images",
            samples["real"][:n],
            samples["real_captions"][: min(n, len(samples["real"]))],
            None,
        ),
    ]
    body = ""
    for heading, imgs, labs, cols in grids:
        grid = labelled_grid(list(imgs), list(labs[: len(imgs)]), colors=cols)
        body += f"<h3>{html.escape(heading)}</h3>{_img(png_bytes(grid), heading)}"
    for label, p in extra_images.items():
        data = read_bytes(p)
        if data is not None:
            body += f"<h3>{html.escape(label)}</h3>{_img(data, label)}"
    sections.append(("Samples", body))
    curves = ""
    for label, p in loss_curves.items():
        data = read_bytes(p)
        curves += f"<h3>{html.escape(label)}</h3>"
        curves += (
            _img(data, label) if data is not None else f"<p>no loss curve at {html.escape(p)}</p>"
        )
    sections.append(("Loss curves", curves))
    with atomic_write(path, "w") as f:
        f.write(render_html(title, sections))
    return path
