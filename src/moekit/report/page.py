"""The HTML of a report: the page, its headings, tables and inline figures.

A figure is a PNG embedded as a data URI, so that the page needs no other file and
no network.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from moekit.plotting import _pyplot
from moekit.report.describe import format_value

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 960px; margin: 2em auto; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: right; }
th { background: #f4f4f4; } img { max-width: 100%; } .note { color: #666; }
pre { background: #f8f8f8; padding: 0.8em; white-space: pre-wrap; overflow-wrap: anywhere; }
.warning { background: #fff4e0; border-left: 4px solid #e08a00; padding: 0.6em 0.9em; }
"""


def embed_png(fig, key: str | None = None, figures: dict | None = None) -> str:
    """The figure as an <img> with its PNG inline (a data URI); the figure is closed.

    With ``figures``, the PNG's bytes are also kept there under ``key``.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    if figures is not None and key is not None:
        figures[key] = buf.getvalue()
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


def html_table(rows: list[list[Any]], header: list[str] | None = None) -> str:
    """A table of ``rows`` under ``header`` (none: no header row); floats to four
    significant digits, text escaped."""

    def cell(v):
        return html.escape(format_value(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header or ())
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table>{f'<tr>{head}</tr>' if head else ''}{body}</table>"


def heading(level: int, prefix: str, key: str, title: str) -> str:
    """A section's heading ``<h{level}>`` whose id is ``prefix + key``."""
    return f'<h{level} id="{prefix}{key}">{html.escape(title)}</h{level}>'


def html_page(title: str, parts: list[str]) -> str:
    """A whole HTML document of the fragments ``parts``, with the report's style."""
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")  # fmt: skip
