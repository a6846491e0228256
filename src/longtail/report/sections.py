"""The page's sections: a ``Section`` is a builder ``(RunData) -> data | None`` and the template drawing it.

A builder returns its template's data, or ``None`` when its inputs are absent; the page then shows the
section's ``missing`` note (which stage has not run), or leaves the section out when it has none (optional
files). A section only appears for the run kinds it lists. To add one, write a builder and a template and
append ``Section(id, title, builder, template)`` to ``SECTIONS`` (or pass ``sections=`` to ``build_html``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jinja2
from markupsafe import Markup

from .analysis import section_distribution, section_introspection, section_trajectory
from .load import KINDS, RunData
from .results import section_accuracy, section_detection, section_overview, section_paired, section_rounds
from .samples import section_calibration, section_generated, section_grids, section_sweep, section_synthetic

SectionBuilder = Callable[[RunData], Any]


@dataclass(frozen=True)
class Section:
    """One part of the page.

    ``build`` returns the data of ``template`` (a file under ``report/templates`` or a ``jinja2.Template``),
    or ``None``. Without a template, a returned ``str`` is shown as escaped text and ``Markup`` as given.
    ``missing`` is the note shown when ``build`` returns ``None`` ("" leaves the section out); ``kinds`` are
    the run kinds (``load.KINDS``) the section belongs to.
    """

    id: str
    title: str
    build: SectionBuilder
    template: str | jinja2.Template | None = None
    missing: str = ""
    kinds: tuple[str, ...] = KINDS


MINE = ("mine",)
SWEEP = ("mine", "calibrate")

SECTIONS: list[Section] = [
    Section("overview", "Run", section_overview, "overview.html.j2"),
    Section(
        "accuracy",
        "Accuracy by condition and group",
        section_accuracy,
        "accuracy.html.j2",
        Markup(
            "no classifier metrics yet: <code>seed_*/base/metrics.json</code> and "
            "<code>seed_*/mining/*/round_*/metrics.json</code> are absent (base and mining stages)."
        ),
        MINE,
    ),
    Section(
        "paired",
        "Paired differences against the baseline",
        section_paired,
        "paired.html.j2",
        kinds=MINE,
    ),
    Section(
        "rounds",
        "Accuracy per mining round",
        section_rounds,
        "rounds.html.j2",
        Markup(
            "no mining rounds yet: <code>seed_*/mining/&lt;condition&gt;/round_*/metrics.json</code> are "
            "absent (mining stage)."
        ),
        MINE,
    ),
    Section(
        "detection",
        "Detecting rare and hard examples (Figures 5, 11)",
        section_detection,
        "detection.html.j2",
        Markup(
            "no detection metrics: <code>seed_*/base/metrics.json</code> is absent or has no "
            "<code>detection</code> (base stage; a run that starts from a trained classifier has none)."
        ),
        MINE,
    ),
    Section(
        "calibration",
        "Chosen guidance weight (section 3.1)",
        section_calibration,
        "calibration.html.j2",
        Markup("Missing <code>calibration.json</code>: the calibration has not finished."),
        ("calibrate",),
    ),
    Section(
        "sweep",
        "Signal and P(class) against the guidance weight (Figure 2)",
        section_sweep,
        "sweep.html.j2",
        Markup("Missing <code>sweep/sweep.json</code>: the guidance sweep has not run (sweep stage)."),
        SWEEP,
    ),
    Section(
        "grids",
        "Unguided vs guided samples (Figure 6)",
        section_grids,
        "grids.html.j2",
        Markup("Missing <code>sweep/grid_*.png</code>: the guidance sweep has not run (sweep stage)."),
        SWEEP,
    ),
    Section(
        "synthetic",
        "Mined synthetic data",
        section_synthetic,
        "synthetic.html.j2",
        Markup(
            "no synthetic data yet: <code>seed_*/mining/*/synthetic/manifest.csv</code> is absent "
            "(mining stage, conditions with synthetic data)."
        ),
        MINE,
    ),
    Section(
        "generated",
        "Generated set",
        section_generated,
        "generated.html.j2",
        Markup("Missing <code>manifest.csv</code> rows: no image has been written yet."),
        ("generate",),
    ),
    Section(
        "distribution",
        "Synthetic vs real distribution (section 3.1)",
        section_distribution,
        "distribution.html.j2",
        kinds=MINE,
    ),
    Section(
        "trajectory",
        "Along the denoising trajectory (Figure 15)",
        section_trajectory,
        "trajectory.html.j2",
        kinds=MINE,
    ),
    Section(
        "introspection",
        "Longtail introspection (section 4.3)",
        section_introspection,
        "introspection.html.j2",
        kinds=MINE,
    ),
]
