"""Write the report: a self-contained report.html (images inline, no external requests) and report.pdf.

The PDF is laid out by ReportLab (pure Python, installs from PyPI on any machine; no browser or system
library needed): portrait A4, Helvetica prose, headings with a table of contents and PDF bookmarks, page
numbers, and tables whose columns are split across several tables when they would not fit the width.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image as PILImage
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import cm
from reportlab.pdfbase.pdfmetrics import stringWidth
from reportlab.platypus import (
    BaseDocTemplate,
    Frame,
    Image,
    KeepTogether,
    PageTemplate,
    Paragraph,
    Spacer,
    Table,
    TableStyle,
)
from reportlab.platypus.tableofcontents import TableOfContents

from .figures import Figure

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f0f0f0; } td.left, th.left { text-align: left; }
.sig { font-weight: bold; } .muted { color: #777; } img { max-width: 100%; }
figure { margin: 1.5em 0; } figcaption { color: #444; font-size: 0.9em; }
code { font-size: 0.85em; }
"""


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)  # plain text, escaped when rendered
    tables: list[pd.DataFrame] = field(default_factory=list)  # shown as is; a column "links" holds trusted HTML
    figures: list[Figure] = field(default_factory=list)


def _cell(value) -> str:
    if isinstance(value, float):
        if np.isnan(value):
            return "—"
        return f"{value:,.0f}" if abs(value) >= 1e4 and value.is_integer() else f"{value:.4g}"
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
        parts.extend(_table_html(table) for table in section.tables if not table.empty)
        for figure in section.figures:
            data = base64.b64encode(figure.png).decode()
            parts.append(
                f"<figure><img alt='{html.escape(figure.caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


# --- PDF -------------------------------------------------------------------------------------------
MARGIN = 1.8 * cm
TABLE_FONT, TABLE_BOLD, TABLE_SIZE = "Helvetica", "Helvetica-Bold", 7.5  # 7.5 pt: legible at 100% zoom
CELL_PAD = 3  # points each side of a cell's text
WIDEST_COLUMN = 130  # points; longer cell text wraps
KEEP_TOGETHER_ROWS = 20
_STYLES = getSampleStyleSheet()
BODY = ParagraphStyle("body", parent=_STYLES["BodyText"], fontName="Helvetica", fontSize=9.5, leading=12.5)
CAPTION = ParagraphStyle("caption", parent=BODY, fontSize=8.5, leading=11, textColor=colors.HexColor("#444444"))
CELL = ParagraphStyle("cell", fontName=TABLE_FONT, fontSize=TABLE_SIZE, leading=TABLE_SIZE * 1.2, alignment=2)
CELL_LEFT = ParagraphStyle("cell-left", parent=CELL, alignment=0)
HEAD = ParagraphStyle("head", parent=CELL, fontName=TABLE_BOLD)
HEAD_LEFT = ParagraphStyle("head-left", parent=HEAD, alignment=0)
HEADING = ParagraphStyle("heading", parent=_STYLES["Heading1"], fontSize=15, leading=19, spaceBefore=14)
HEADINGS = {HEADING.name: 0}  # heading style -> level in the contents and the PDF outline


class _Report(BaseDocTemplate):
    """Portrait A4 pages with the title and page number in the margins; headings feed the contents."""

    def __init__(self, path: Path, title: str):
        super().__init__(
            str(path),
            pagesize=A4,
            leftMargin=MARGIN,
            rightMargin=MARGIN,
            topMargin=MARGIN,
            bottomMargin=MARGIN,
            title=title,
            author="LiquidDiffusion Lab, reports/build.py",
        )
        self.report_title = title
        self.pages = 0
        frame = Frame(self.leftMargin, self.bottomMargin, self.width, self.height, id="body")
        self.addPageTemplates(PageTemplate("page", [frame], onPage=self._margins))

    def _margins(self, canvas, doc) -> None:
        canvas.saveState()
        canvas.setFont("Helvetica", 7.5)
        canvas.setFillColor(colors.grey)
        width, height = A4
        canvas.drawString(MARGIN, height - MARGIN / 2, self.report_title)
        canvas.drawCentredString(width / 2, MARGIN / 2, f"page {doc.page}")
        canvas.restoreState()
        self.pages = doc.page

    def afterFlowable(self, flowable) -> None:
        if isinstance(flowable, Paragraph) and flowable.style.name in HEADINGS:
            text, level = flowable.getPlainText(), HEADINGS[flowable.style.name]
            key = f"h{level}-{text}"
            self.canv.bookmarkPage(key)
            self.canv.addOutlineEntry(text, key, level)
            self.notify("TOCEntry", (level, text, self.page, key))


def _column_chunks(widths: list[float], room: float) -> list[list[int]]:
    """Column indices per table: the first column (the arm) starts every table, the rest fill the width."""
    chunks, current, used = [], [0], widths[0]
    for i, width in enumerate(widths[1:], start=1):
        if used + width > room and len(current) > 1:
            chunks.append(current)
            current, used = [0], widths[0]
        current.append(i)
        used += width
    return [*chunks, current]


def _pdf_tables(table: pd.DataFrame, room: float) -> list[Table]:
    shown = table.drop(columns=[c for c in ("links",) if c in table])
    texts = [[_cell(v) for v in row] for row in shown.itertuples(index=False)]
    headers = [html.escape(str(c)) for c in shown.columns]

    def natural(i: int) -> float:  # the column's width without wrapping, header words may wrap
        cells = [stringWidth(html.unescape(row[i]), TABLE_FONT, TABLE_SIZE) for row in texts]
        words = [stringWidth(w, TABLE_BOLD, TABLE_SIZE) for w in html.unescape(headers[i]).split()]
        return min(WIDEST_COLUMN, max([*cells, *words, 12])) + 2 * CELL_PAD + 1

    widths = [natural(i) for i in range(len(headers))]
    out = []
    for chunk in _column_chunks(widths, room):
        cells = [[Paragraph(headers[i], HEAD_LEFT if i == 0 else HEAD) for i in chunk]]
        cells += [[Paragraph(row[i], CELL_LEFT if i == 0 else CELL) for i in chunk] for row in texts]
        pdf_table = Table(cells, colWidths=[widths[i] for i in chunk], repeatRows=1, hAlign="LEFT")
        pdf_table.setStyle(
            TableStyle(
                [
                    ("GRID", (0, 0), (-1, -1), 0.25, colors.HexColor("#bbbbbb")),
                    ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eeeeee")),
                    ("VALIGN", (0, 0), (-1, -1), "TOP"),
                    ("LEFTPADDING", (0, 0), (-1, -1), CELL_PAD),
                    ("RIGHTPADDING", (0, 0), (-1, -1), CELL_PAD),
                ]
            )
        )
        # a short table moves to the next page whole rather than leave a row or two behind
        out += [KeepTogether([pdf_table]) if len(texts) <= KEEP_TOGETHER_ROWS else pdf_table, Spacer(1, 8)]
    return out


def _pdf_figure(figure: Figure, room: float, max_height: float) -> KeepTogether:
    width, height = PILImage.open(io.BytesIO(figure.png)).size
    scale = min(room / width, max_height / height)
    image = Image(io.BytesIO(figure.png), width=width * scale, height=height * scale, hAlign="LEFT")
    return KeepTogether([image, Paragraph(html.escape(figure.caption), CAPTION), Spacer(1, 10)])


def write_pdf(path: Path, title: str, sections: list[Section]) -> int:
    """The sections as a paper's appendix would set them; returns the page count."""
    doc = _Report(path, title)
    contents = TableOfContents()
    contents.levelStyles = [ParagraphStyle("toc", parent=BODY, leftIndent=12, firstLineIndent=-12, spaceBefore=2)]
    story = [Paragraph(html.escape(title), _STYLES["Title"]), Paragraph("Contents", _STYLES["Heading2"]), contents]
    for section in sections:
        story.append(Paragraph(html.escape(section.title), HEADING))
        story += [Paragraph(html.escape(p), BODY) for p in section.paragraphs]
        for table in section.tables:
            if not table.empty:
                story += _pdf_tables(table, doc.width)
        story += [_pdf_figure(f, doc.width, 0.8 * doc.height) for f in section.figures]
    doc.multiBuild(story)  # two passes: the contents learn each heading's page
    return doc.pages
