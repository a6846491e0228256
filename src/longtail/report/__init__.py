"""One self-contained HTML page for any run directory (``longtail report RUN_DIR``).

``load_run`` reads a mine / demo run, a ``longtail generate`` output or a ``longtail calibrate`` output into
one ``RunData`` (``load``); each ``Section`` turns it into data for its Jinja2 template, autoescaped
(``sections``, ``templates/``); ``build_html`` / ``write_report`` draw the page (``page``). Figures are drawn
with matplotlib and every image is a ``data:image/png`` URI: the file opens anywhere, offline, without
scripts.
"""

from __future__ import annotations

from .cells import shrink_png
from .load import KINDS, RunData, load_run, run_kind
from .page import build_html, render_section, write_report
from .plots import grid_geometry, plot_distribution, plot_roc
from .sections import SECTIONS, Section

__all__ = [
    "KINDS",
    "SECTIONS",
    "RunData",
    "Section",
    "build_html",
    "grid_geometry",
    "load_run",
    "plot_distribution",
    "plot_roc",
    "render_section",
    "run_kind",
    "shrink_png",
    "write_report",
]
