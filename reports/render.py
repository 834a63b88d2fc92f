"""Write the report: a self-contained report.html (images inline, no external requests) and report.pdf."""

from __future__ import annotations

import base64
import html
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.backends.backend_pdf import PdfPages

from .figures import to_png

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f0f0f0; } td.left, th.left { text-align: left; }
.sig { font-weight: bold; } .muted { color: #777; } img { max-width: 100%; }
code { font-size: 0.85em; }
"""


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)  # plain text, escaped when rendered
    table: pd.DataFrame | None = None  # shown as is; a column named "links" holds trusted HTML
    figures: list[plt.Figure] = field(default_factory=list)


def _cell(value) -> str:
    if isinstance(value, float):
        return "—" if np.isnan(value) else f"{value:.4g}"
    if value is None or (isinstance(value, str) and not value):
        return "—"
    return html.escape(str(value))


def _table_html(table: pd.DataFrame) -> str:
    head = "".join(
        f'<th class="left">{html.escape(c)}</th>' if i < 2 else f"<th>{html.escape(c)}</th>"
        for i, c in enumerate(table.columns)
    )
    rows = []
    for _, row in table.iterrows():
        cells = []
        for i, (column, value) in enumerate(row.items()):
            text = value if column == "links" else _cell(value)
            cls = ' class="left"' if i < 2 or column == "links" else ""
            cells.append(f"<td{cls}>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def write_html(path: Path, title: str, sections: list[Section]) -> None:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts.extend(f"<p>{html.escape(p)}</p>" for p in section.paragraphs)
        if section.table is not None and not section.table.empty:
            parts.append(_table_html(section.table))
        for fig in section.figures:
            data = base64.b64encode(to_png(fig)).decode()
            parts.append(f"<p><img alt='{html.escape(section.title)}' src='data:image/png;base64,{data}'></p>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


def _text_page(pdf: PdfPages, title: str, lines: list[str]) -> None:
    fig = plt.figure(figsize=(11.69, 8.27))
    fig.text(0.05, 0.95, title, fontsize=14, weight="bold", va="top")
    wrapped = [w for line in lines for w in (textwrap.wrap(line, 150) or [""])]
    fig.text(0.05, 0.90, "\n".join(wrapped[:55]), fontsize=8, va="top", family="monospace")
    pdf.savefig(fig)
    plt.close(fig)


def _table_page(pdf: PdfPages, title: str, table: pd.DataFrame) -> None:
    fig = plt.figure(figsize=(11.69, 8.27))
    fig.text(0.05, 0.95, title, fontsize=12, weight="bold", va="top")
    shown = table.drop(columns=[c for c in ("links",) if c in table]).head(40)
    cells = [[_cell(v).replace("&amp;", "&") for v in row] for row in shown.itertuples(index=False)]
    ax = fig.add_axes([0.03, 0.05, 0.94, 0.85])
    ax.axis("off")
    if cells:
        t = ax.table(cellText=cells, colLabels=list(shown.columns), loc="upper left", cellLoc="right")
        t.auto_set_font_size(False)
        t.set_fontsize(7)
        t.auto_set_column_width(list(range(len(shown.columns))))
    pdf.savefig(fig)
    plt.close(fig)


def write_pdf(path: Path, title: str, sections: list[Section]) -> int:
    """One text page for the sections' prose, then a page per table and per figure; returns the page count."""
    pages = 0
    with PdfPages(path) as pdf:
        lines = []
        for section in sections:
            if section.paragraphs:
                lines += [section.title.upper(), *section.paragraphs, ""]
        _text_page(pdf, title, lines)
        pages += 1
        for section in sections:
            if section.table is not None and not section.table.empty:
                _table_page(pdf, section.title, section.table)
                pages += 1
            for fig in section.figures:
                pdf.savefig(fig)
                pages += 1
    return pages
