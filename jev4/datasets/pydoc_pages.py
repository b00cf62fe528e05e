"""The built-in ``pydoc-pages`` set: a query naming a Python help topic -> an image of that topic's help text.

Deterministic for a given Python installation and Pillow version; docs/datasets.md describes how it is built.
"""

from __future__ import annotations

import sysconfig
import textwrap

from PIL import Image, ImageDraw, ImageFont

from jev4.datasets.containers import DatasetError, RetrievalDataset


PAGE_CHARS = 1000
MIN_TOPIC_CHARS = 200
PAGE_MARGIN = 6  # pixels at render scale
PAGE_BASE = 448  # a page is laid out for this many pixels (about 72 columns x 33 lines of the 6x11 font)


def _bitmap_font() -> ImageFont.ImageFont:
    """Pillow's built-in bitmap font (fixed 6x11 glyphs): no FreeType, identical on every machine."""
    loader = getattr(ImageFont, "load_default_imagefont", None)  # Pillow >= 10.1
    return loader() if loader is not None else ImageFont.load_default()


def _wrap_page(text: str, columns: int, rows: int) -> list[str]:
    """The text's lines, each wrapped at ``columns`` (indentation kept), cut to ``rows`` lines."""
    out: list[str] = []
    for line in text.expandtabs(4).split("\n"):
        line = "".join(ch if ch.isprintable() else " " for ch in line).rstrip()
        indent = line[: len(line) - len(line.lstrip())]
        wrapped = textwrap.wrap(line, width=columns, subsequent_indent=indent[: columns // 2], drop_whitespace=True) or [""]
        out.extend(wrapped)
        if len(out) >= rows:
            break
    return out[:rows]


def _render_page(text: str, size: tuple[int, int], font: ImageFont.ImageFont) -> Image.Image:
    """Black text on white; sizes of 896+ pixels are drawn at 1/scale and enlarged (nearest), so the text keeps its share of the page."""
    width, height = size
    scale = max(1, min(width, height) // PAGE_BASE)
    canvas = (max(1, width // scale), max(1, height // scale))
    left, top, right, bottom = font.getbbox("M")
    char_w = max(1, int(font.getlength("M")))
    line_h = max(1, bottom - top) + 2
    columns = max(1, (canvas[0] - 2 * PAGE_MARGIN) // char_w)
    rows = max(1, (canvas[1] - 2 * PAGE_MARGIN) // line_h)
    image = Image.new("RGB", canvas, "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(_wrap_page(text, columns, rows)):
        # Only ASCII survives the bitmap font; anything else becomes "?" (same on every machine).
        draw.text((PAGE_MARGIN, PAGE_MARGIN + i * line_h), line.encode("ascii", "replace").decode(), fill="black", font=font)
    if image.size != size:
        image = image.resize(size, Image.Resampling.NEAREST)
    return image


def _topic_query(title: str) -> str:
    return "Python documentation: " + " ".join(title.replace("_", " ").replace("-", " ").split())


def rendered_pages(max_pages: int = 300, size: tuple[int, int] = (448, 448)) -> RetrievalDataset:
    """Built-in ``pydoc-pages``: a query naming a Python help topic -> a rendered image of its help text.

    Source: ``pydoc_data.topics.topics`` (the text of ``help("assert")`` etc.),
    sorted titles, topics with at least 200 characters of text. Each page is
    the topic's first 1000 characters (stripped), each line wrapped at the
    page width (indentation kept) and cut to the lines that fit, drawn in
    black with Pillow's built-in 6x11 bitmap font (13-pixel lines, 6-pixel
    margin) on a white RGB canvas of ``size / scale`` (scale = min(size) //
    448, at least 1), enlarged by nearest-neighbour to ``size`` when scale > 1. Query: ``"Python documentation: "``
    + the title with underscores and dashes as spaces (a repeated query is
    dropped). One relevant page (relevance 1) per query; task ``retrieval``.
    """
    if max_pages < 1:
        raise DatasetError(f"pydoc-pages: max_pages must be >= 1, got {max_pages}")
    if len(size) != 2 or min(size) < 32:
        raise DatasetError(f"pydoc-pages: size must be (width, height) of at least 32 pixels, got {size}")
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:
        raise DatasetError(f"pydoc-pages: this Python has no pydoc_data.topics ({exc})") from exc
    font = _bitmap_font()
    queries: list[str] = []
    pages: list[Image.Image] = []
    for title in sorted(topics):
        text = topics[title]
        if len(text.strip()) < MIN_TOPIC_CHARS:
            continue
        query = _topic_query(title)
        if query in queries:
            continue
        queries.append(query)
        pages.append(_render_page(text.strip()[:PAGE_CHARS], tuple(size), font))
        if len(pages) == max_pages:
            break
    return RetrievalDataset(
        name="pydoc-pages",
        queries=queries,
        documents=pages,
        doc_kind="image",
        qrels=[{i: 1.0} for i in range(len(queries))],
        task="retrieval",
        description=f"Python {sysconfig.get_python_version()} help topics (pydoc_data.topics) rendered as {size[0]}x{size[1]} page images; {len(pages)} pages",
    )
