"""One self-contained HTML page for any run directory (``longtail report RUN_DIR``): ``load_run`` reads it,
each ``Section`` of ``page`` draws a part; figures are inlined PNGs, so the file opens anywhere, offline."""

from __future__ import annotations

from .cells import shrink_png
from .gallery import GALLERY, build_gallery, write_gallery
from .load import KINDS, RunData, load_run, run_kind
from .page import SECTIONS, Section, build_html, render_section, write_report
from .plots import grid_geometry, plot_distribution, plot_roc

__all__ = [
    "GALLERY",
    "KINDS",
    "SECTIONS",
    "RunData",
    "Section",
    "build_gallery",
    "build_html",
    "grid_geometry",
    "load_run",
    "plot_distribution",
    "plot_roc",
    "render_section",
    "run_kind",
    "shrink_png",
    "write_gallery",
    "write_report",
]
