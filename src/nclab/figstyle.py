"""One figure style for every nclab figure: two sizes, readable fonts, vector PDF and 200-dpi PNG.

Every figure is drawn twice by a ``draw(size)`` function:

* ``"full"``: a paper's text width, :data:`WIDTH_IN` ["full"] = 6.9 in, saved as
  ``<stem>.pdf`` and ``<stem>.png``;
* ``"column"``: one column, 3.3 in, panels two by two, saved as ``<stem>-column.pdf`` and
  ``<stem>-column.png``.

Inside ``draw`` the rcParams of :func:`rc` are in force (fonts of at least
:data:`MIN_FONT_PT` points at that size). :func:`overlapping_tick_labels` uses
matplotlib's own renderer extents, for tests.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SIZES = ("full", "column")
FORMATS = ("pdf", "png", "svg")
#: figure width in inches
WIDTH_IN = {"full": 6.9, "column": 3.3}
#: the smallest font, in points, at the saved size
MIN_FONT_PT = 7
PNG_DPI = 200


def rc(size: str) -> dict:
    """rcParams for ``size``: 7-8 pt text, thin lines, vector-friendly fonts in the PDF."""
    return {
        "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": MIN_FONT_PT,
        "xtick.labelsize": MIN_FONT_PT, "ytick.labelsize": MIN_FONT_PT, "figure.titlesize": 8,
        "lines.linewidth": 1.0 if size == "full" else 0.8, "axes.linewidth": 0.6,
        "legend.frameon": False, "pdf.fonttype": 42, "svg.fonttype": "none",
        "figure.constrained_layout.use": True,
    }


def grid(n_panels: int, size: str, *, rows_of: int = 4, height_per_row: float | None = None):
    """A figure with ``n_panels`` axes: full width puts up to ``rows_of`` panels in a row,
    a column two per row. Returns (fig, flat list of axes); unused axes are removed."""
    per_row = min(rows_of, n_panels) if size == "full" else min(2, n_panels)
    rows = -(-n_panels // per_row)
    width = WIDTH_IN[size]
    height = height_per_row or (width / per_row) * 0.95
    fig, axes = plt.subplots(rows, per_row, figsize=(width, height * rows + 0.35), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n_panels:]:
        ax.remove()
    return fig, flat[:n_panels]


def save(draw, folder, stem: str = "figure", sizes=SIZES, formats=("pdf", "png")) -> list[Path]:
    """Draw and save the figure at every size in every format into ``folder``
    (a :class:`nclab.rundir.Folder`), atomically; returns the paths written."""
    paths = []
    for size in sizes:
        name = stem if size == "full" else f"{stem}-{size}"
        with matplotlib.rc_context(rc(size)):
            fig = draw(size)
            try:
                for fmt in formats:
                    with folder.atomic(f"{name}.{fmt}") as tmp:
                        fig.savefig(tmp, format=fmt, dpi=PNG_DPI if fmt == "png" else None)
                    paths.append(folder.path(f"{name}.{fmt}"))
            finally:
                plt.close(fig)
    return paths


def overlapping_tick_labels(fig) -> list[tuple[str, str]]:
    """Pairs of visible tick labels of one axis whose rendered boxes overlap (should be none)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    clashes = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
            boxes = [t.get_window_extent(renderer) for t in labels]
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    if boxes[i].overlaps(boxes[j]):
                        clashes.append((labels[i].get_text(), labels[j].get_text()))
    return clashes


def smallest_font_pt(fig) -> float:
    """The smallest font size (points) of any visible text in the figure."""
    sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text()]
    return min(sizes) if sizes else float("inf")
