"""Render sections with Jinja2 (autoescape on) into one self-contained page, and write it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jinja2
from markupsafe import Markup

from .cells import Note
from .load import RunData, load_run
from .sections import SECTIONS, Section

HEADINGS = {
    "mine": "Longtail Guidance run",
    "generate": "Longtail generated set",
    "calibrate": "Longtail guidance calibration",
}


@cache
def environment() -> jinja2.Environment:
    """Templates from ``report/templates``; every ``{{ value }}`` is HTML-escaped unless it is ``Markup``."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("longtail.report", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )


@dataclass(frozen=True)
class Rendered:
    """A section as drawn: its HTML body and status ``ok`` / ``missing`` / ``error``."""

    id: str
    title: str
    body: Markup
    status: str


def _note(text: str, kind: str) -> Markup:
    return Markup(environment().get_template("note.html.j2").render(note=Note(text, kind)))


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
    try:
        data = section.build(run)
        if data is None:
            if not section.missing:
                return None
            return Rendered(
                section.id,
                section.title,
                _note(Markup("Not in this run yet. ") + section.missing, "missing"),
                "missing",
            )
        return Rendered(section.id, section.title, _body(section, run, data), "ok")
    except Exception as err:  # a broken section must not take the whole page down
        text = f"Could not render this section: {type(err).__name__}: {err}"
        return Rendered(section.id, section.title, _note(text, "error"), "error")


def build_html(run: RunData, sections: Sequence[Section] | None = None) -> str:
    """The whole page as a string."""
    rendered = [r for s in (SECTIONS if sections is None else sections) if (r := render_section(s, run))]
    name = run.root.resolve().name
    return (
        environment()
        .get_template("page.html.j2")
        .render(
            heading=HEADINGS.get(run.kind, HEADINGS["mine"]),
            name=name,
            path=str(run.root.resolve()),
            stamp=dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            seeds=str(run.seeds or "–") if run.kind == "mine" else "",
            sections=rendered,
        )
    )


def write_report(
    run_dir: str | Path, out: str | Path | None = None, sections: Sequence[Section] | None = None
) -> Path:
    """Write the HTML report of ``run_dir`` to ``out`` (default ``<run_dir>/report.html``); returns its path.

    Raises ``FileNotFoundError`` naming ``run_dir`` if it does not exist or holds no run.
    """
    run = load_run(run_dir)
    path = Path(out) if out is not None else run.root / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(build_html(run, sections), encoding="utf-8")
    tmp.replace(path)
    return path
