"""The page: each ``Section`` is a builder ``(RunData) -> data | None`` and the Jinja2 template drawing it
(autoescaped). To add one, write both and append it to ``SECTIONS`` (or pass ``sections=`` to ``build_html``).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from markupsafe import Markup, escape

from .analysis import section_distribution, section_introspection, section_modes, section_trajectory
from .cells import DASH
from .gallery import GALLERY, write_gallery
from .load import KINDS, RunData, load_run
from .results import (
    section_accuracy,
    section_detection,
    section_efficiency,
    section_nuisance,
    section_overview,
    section_paired,
    section_rounds,
)
from .samples import section_calibration, section_generated, section_grids, section_sweep, section_synthetic

HEADINGS = {"mine": "Guidance run", "generate": "generated set", "calibrate": "guidance calibration"}
SectionBuilder = Callable[[RunData], Any]


@dataclass(frozen=True)
class Section:
    """One part of the page: ``build`` returns the data of ``template`` (a file under ``templates/`` or a
    ``jinja2.Template``; without one, ``str`` is shown escaped, ``Markup`` as given) or ``None``, which shows
    the ``missing`` note ("" leaves the section out). ``kinds``: the run kinds it belongs to."""

    id: str
    title: str
    build: SectionBuilder
    template: str | jinja2.Template | None = None
    missing: str = ""
    kinds: tuple[str, ...] = KINDS


MINE, SWEEP = ("mine",), ("mine", "calibrate")
MISSING = {  # the note shown when a section's builder returns None; `text` is set as code
    "accuracy": "no classifier metrics yet: `seed_*/base/metrics.json` and "
    "`seed_*/mining/*/round_*/metrics.json` are absent (base and mining stages).",
    "rounds": "no mining rounds yet: `seed_*/mining/<condition>/round_*/metrics.json` are absent "
    "(mining stage).",
    "detection": "no detection metrics: `seed_*/base/metrics.json` is absent or has no `detection` "
    "(base stage; a run that starts from a trained classifier has none).",
    "calibration": "Missing `calibration.json`: the calibration has not finished.",
    "sweep": "Missing `sweep/sweep.json`: the guidance sweep has not run (sweep stage).",
    "grids": "Missing `sweep/grid_*.png`: the guidance sweep has not run (sweep stage).",
    "synthetic": "no synthetic data yet: `seed_*/mining/*/synthetic/manifest.csv` is absent (mining stage, "
    "conditions with synthetic data).",
    "generated": "Missing `manifest.csv` rows: no image has been written yet.",
}


def _section(id: str, title: str, build: SectionBuilder, kinds: tuple[str, ...] = MINE) -> Section:
    """A section drawn by ``templates/<id>.html.j2``, with its ``MISSING`` note (if any)."""
    missing = re.sub(r"`([^`]*)`", r"<code>\1</code>", str(escape(MISSING.get(id, ""))))
    return Section(id, title, build, f"{id}.html.j2", Markup(missing), kinds)


SECTIONS: list[Section] = [
    _section("overview", "Run", section_overview, KINDS),
    _section("accuracy", "Accuracy by condition and group", section_accuracy),
    _section("paired", "Paired differences against the baseline", section_paired),
    _section("nuisance", "Nuisance test splits", section_nuisance),
    _section("efficiency", "Data efficiency (synthetic images per class)", section_efficiency),
    _section("rounds", "Accuracy per mining round", section_rounds),
    _section("detection", "Detecting rare and hard examples (Figures 5, 11)", section_detection),
    _section("calibration", "Chosen guidance weight (section 3.1)", section_calibration, ("calibrate",)),
    _section("sweep", "Signal and P(class) against the guidance weight (Figure 2)", section_sweep, SWEEP),
    _section("grids", "Unguided vs guided samples (Figure 6)", section_grids, SWEEP),
    _section("synthetic", "Mined synthetic data", section_synthetic),
    _section("modes", "Nuisance modes in the synthetic data", section_modes),
    _section("generated", "Generated set", section_generated, ("generate",)),
    _section("distribution", "Synthetic vs real distribution (section 3.1)", section_distribution),
    _section("trajectory", "Along the denoising trajectory (Figure 15)", section_trajectory),
    _section("introspection", "Longtail introspection (section 4.3)", section_introspection),
]


@cache
def environment() -> jinja2.Environment:
    """Templates from ``report/templates``, autoescaped, with ``macros.html.j2`` available as ``m``."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("longtail.report", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.globals["m"] = env.get_template("macros.html.j2").module
    return env


@dataclass(frozen=True)
class Rendered:
    """A section as drawn: its HTML body and status ``ok`` / ``missing`` / ``error``."""

    id: str
    title: str
    body: Markup
    status: str


def _body(section: Section, run: RunData, data: object) -> Markup:
    if section.template is None:
        return data if isinstance(data, Markup) else Markup("<p>{}</p>").format(data)
    template = section.template
    if isinstance(template, str):
        template = environment().get_template(template)
    return Markup(template.render(d=data, run=run))


def render_section(section: Section, run: RunData) -> Rendered | None:
    """The section drawn for ``run``; ``None`` when left out (another run kind, or optional and absent)."""
    if run.kind not in section.kinds:
        return None
    note = environment().globals["m"].note
    try:
        data = section.build(run)
        if data is None:
            missing = note(Markup("Not in this run yet. ") + section.missing, "missing")
            return Rendered(section.id, section.title, missing, "missing") if section.missing else None
        return Rendered(section.id, section.title, _body(section, run, data), "ok")
    except Exception as err:  # a broken section must not take the whole page down
        text = f"Could not render this section: {type(err).__name__}: {err}"
        return Rendered(section.id, section.title, note(text, "error"), "error")


def build_html(run: RunData, sections: Sequence[Section] | None = None) -> str:
    """The whole page as a string."""
    rendered = [r for s in (SECTIONS if sections is None else sections) if (r := render_section(s, run))]
    page = environment().get_template("page.html.j2")
    return page.render(
        heading="Longtail " + HEADINGS.get(run.kind, HEADINGS["mine"]),
        path=run.root.resolve(),
        stamp=dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        seeds=str(run.seeds or DASH) if run.kind == "mine" else "",
        sections=rendered,
    )


def write_report(
    run_dir: str | Path, out: str | Path | None = None, sections: Sequence[Section] | None = None
) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``<run_dir>/report.html``); returns its path.

    When the run has synthetic images, ``gallery.html`` (``gallery.py``) is written next to the report first,
    and the report's synthetic-data section links to it."""
    run = load_run(run_dir)
    path = Path(out) if out is not None else run.root / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    gallery = path.with_name(GALLERY) if path.name != GALLERY else path.with_name(f"{path.stem}.gallery.html")
    if write_gallery(run, gallery, report=quote(path.name)) is not None:
        run.gallery = quote(gallery.name)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(build_html(run, sections), encoding="utf-8")
    tmp.replace(path)
    return path
