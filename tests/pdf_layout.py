"""Layout checks of a PDF as a reader sees it: pages rendered by PDFium, text boxes read from the same pages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

SMALLEST_TEXT_PT = 6.5  # below this a table is not legible at 100% zoom
EDGE_PT = 4  # ink this close to the paper's edge has run off the page


def layout_problems(path: Path) -> list[str]:
    """One line per problem: a landscape page, text outside the page or too small, ink at the paper's edge."""
    problems = []
    pdf = pdfium.PdfDocument(str(path))
    for number, page in enumerate(pdf, start=1):
        width, height = page.get_size()
        if width > height:
            problems.append(f"page {number}: landscape ({width:.0f} x {height:.0f} pt)")
        text = page.get_textpage()
        outside, small = [], set()
        for i in range(text.count_chars()):
            char = text.get_text_range(i, 1)
            if not char.strip():
                continue
            left, bottom, right, top = text.get_charbox(i)
            if left < 0 or bottom < 0 or right > width or top > height:
                outside.append(char)
            size = pdfium_c.FPDFText_GetFontSize(text.raw, i)
            if size < SMALLEST_TEXT_PT:
                small.add(round(size, 1))
        if outside:
            problems.append(f"page {number}: {len(outside)} characters outside the page: {''.join(outside)[:60]!r}")
        if small:
            problems.append(f"page {number}: text at {sorted(small)} pt, under {SMALLEST_TEXT_PT} pt")
        pixels = page.render(scale=1).to_numpy().min(axis=-1)  # one point per pixel, darkest channel
        edge = int(EDGE_PT)
        border = np.concatenate(
            [pixels[:edge].ravel(), pixels[-edge:].ravel(), pixels[:, :edge].ravel(), pixels[:, -edge:].ravel()]
        )
        if (border < 200).any():
            problems.append(f"page {number}: ink within {EDGE_PT} pt of the paper's edge (clipped content)")
    return problems


def page_texts(path: Path) -> list[str]:
    pdf = pdfium.PdfDocument(str(path))
    return [page.get_textpage().get_text_range() for page in pdf]
