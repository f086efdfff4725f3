"""Search results as pictures: a self-contained HTML page or a PNG contact sheet.

One row per query: the query image, then its neighbours best first, each with its rank and score.
When both the query's and a neighbour's labels are known, the neighbour is framed green when the
labels agree and red when they do not (grey when either is unknown).
"""

from __future__ import annotations

import base64
import html as html_lib
import io
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = ["write_html", "write_sheet", "frame_colour", "THUMB"]

#: Thumbnail side in pixels.
THUMB = 96
GREEN, RED, GREY, BLUE = (30, 160, 60), (210, 40, 40), (150, 150, 150), (40, 90, 200)


def frame_colour(query_label: Optional[str], label: Optional[str]) -> tuple:
    """Green for a neighbour of the query's label, red for another label, grey when either is unknown."""
    if not query_label or not label:
        return GREY
    return GREEN if query_label == label else RED


def _thumb(open_image: Callable[[str], Any], key: str):
    """A ``THUMB`` x ``THUMB`` RGB thumbnail (nearest-neighbour upscaling keeps tiny images sharp)."""
    from PIL import Image

    im = open_image(key).convert("RGB")
    im.thumbnail((THUMB, THUMB), Image.BICUBIC)
    if max(im.size) < THUMB:
        s = THUMB / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.NEAREST)
    return im


def write_html(path: Path, results: Sequence[Dict[str, Any]], open_query: Callable[[str], Any],
               open_gallery: Callable[[str], Any]) -> Path:
    """A single HTML file (images inlined as PNG data URIs) of ``results`` (:func:`metric.retrieval.search_store`).

    Args:
        path: The ``.html`` file to write.
        results: The entries of the search's ``results``.
        open_query: Query key -> PIL image.
        open_gallery: Gallery item key -> PIL image.
    """

    def uri(im) -> str:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    esc = html_lib.escape
    rows: List[str] = []
    for e in results:
        q = e["query"]
        pred = e.get("prediction")
        cells = [f'<td class="q"><img src="{uri(_thumb(open_query, q))}" title="{esc(q)}"><br>{esc(q)}'
                 + (f"<br>label {esc(e['query_label'])}" if e.get("query_label") else "")
                 + (f"<br>predicted <b>{esc(str(pred['label']))}</b> ({pred['confidence']:.2f})" if pred else "") + "</td>"]
        for n in e["neighbours"]:
            c = "rgb(%d,%d,%d)" % frame_colour(e.get("query_label"), n["label"])
            cells.append(f'<td><img src="{uri(_thumb(open_gallery, n["item"]))}" style="border:4px solid {c}" '
                         f'title="{esc(n["item"])}"><br>#{n["rank"]} {n["score"]:.3f}'
                         + (f"<br>{esc(n['label'])}" if n["label"] else "") + "</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>search results</title><style>"
            "body{font-family:sans-serif;font-size:12px}td{text-align:center;vertical-align:top;padding:4px}"
            "td.q{border-right:2px solid #444}img{image-rendering:pixelated}</style></head><body>"
            "<p>Each row: the query, then its nearest gallery images (rank, similarity); frames: green = same "
            "label as the query, red = another label, grey = unknown.</p><table>" + "".join(rows)
            + "</table></body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def write_sheet(path: Path, results: Sequence[Dict[str, Any]], open_query: Callable[[str], Any],
                open_gallery: Callable[[str], Any]) -> Path:
    """A PNG contact sheet of ``results``: one row per query, the query framed blue, neighbours green/red.

    Args:
        path: The ``.png`` file to write.
        results: The entries of the search's ``results``.
        open_query: Query key -> PIL image.
        open_gallery: Gallery item key -> PIL image.
    """
    from PIL import Image, ImageDraw

    pad, border, text_h = 6, 4, 14
    cell_w, cell_h = THUMB + 2 * border + pad, THUMB + 2 * border + text_h + pad
    cols = 1 + max((len(e["neighbours"]) for e in results), default=0)
    sheet = Image.new("RGB", (pad + cols * cell_w + pad, pad + max(len(results), 1) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)

    def put(im, col: int, row: int, colour: tuple, caption: str) -> None:
        x, y = pad + col * cell_w + (pad if col else 0), pad + row * cell_h
        draw.rectangle([x, y, x + THUMB + 2 * border - 1, y + THUMB + 2 * border - 1], fill=colour)
        sheet.paste(im, (x + border + (THUMB - im.width) // 2, y + border + (THUMB - im.height) // 2))
        draw.text((x, y + THUMB + 2 * border + 1), caption, fill=(0, 0, 0))

    for r, e in enumerate(results):
        pred = e.get("prediction")
        caption = f"pred {pred['label']} ({pred['confidence']:.2f})" if pred else (f"label {e['query_label']}" if e.get("query_label") else "query")
        put(_thumb(open_query, e["query"]), 0, r, BLUE, caption)
        for c, n in enumerate(e["neighbours"], start=1):
            put(_thumb(open_gallery, n["item"]), c, r, frame_colour(e.get("query_label"), n["label"]),
                f"#{n['rank']} s={n['score']:.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
