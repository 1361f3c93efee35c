"""`unipelt-report --html`: the whole report as one self-contained page (report.html).

Every table of the report (rendered by `Table.to_html`) and every figure (its PNG embedded as a base64 data URI),
with the CSS inline: the file opens anywhere, offline, and can be mailed or attached on its own.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape
from pathlib import Path

from .tables import Table

HTML_FILE = "report.html"

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2rem auto; max-width: 72rem;
       padding: 0 1rem; color: #1b1f24; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; margin: 0.8rem 0; font-variant-numeric: tabular-nums; font-size: 0.9rem; }
caption { text-align: left; font-weight: 600; padding: 0.3rem 0; }
th, td { padding: 0.25rem 0.6rem; border-bottom: 1px solid #e5e8eb; }
thead th { border-bottom: 2px solid #8c959f; }
.l { text-align: left; } .r { text-align: right; } .c { text-align: center; }
.std { color: #57606a; } ul.notes { font-size: 0.85rem; color: #57606a; }
figure { margin: 1rem 0 2rem; } figure img { max-width: 100%; height: auto; border: 1px solid #e5e8eb; }
figcaption { font-size: 0.9rem; color: #57606a; } p.meta { color: #57606a; font-size: 0.9rem; }
"""


def image_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def render_page(title: str, tables: Sequence[Table], figures: Sequence[tuple[str, Path]],
                meta: Sequence[str] = ()) -> str:
    """The page: a heading, `meta` lines, every table, then every figure ((caption, PNG path) pairs)."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{escape(title)}</title><style>{CSS}</style></head><body>", f"<h1>{escape(title)}</h1>"]
    parts += [f'<p class="meta">{escape(line)}</p>' for line in meta]
    parts += [t.to_html() for t in tables]
    if figures:
        parts.append('<section class="figures"><h2>Figures</h2>')
        for caption, path in figures:
            parts.append(f"<figure>{image_tag(path, caption)}<figcaption>{escape(caption)}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_page(out_dir: Path, title: str, tables: Sequence[Table], figures: Sequence[tuple[str, Path]],
               meta: Sequence[str] = ()) -> Path:
    path = Path(out_dir) / HTML_FILE
    path.write_text(render_page(title, tables, figures, meta), encoding="utf-8")
    return path
