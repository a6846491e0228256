"""The gallery: ``gallery.html`` next to the report, every synthetic image of a run (each seed's and condition's
``seed_<s>/mining/<condition>/synthetic/`` store, or the single store of a ``longtail generate`` output) as a
thumbnail, filtered by class, condition, seed, round and weight and sorted by signal, P(class), weight or round.

Images are referenced by relative path (URL-quoted, relative to the gallery's folder), not inlined, so the page
stays light for thousands of images and works from ``file://``. The rows are one JSON object in a
``<script type="application/json" id="rows">``; ``gallery.js`` (hand-written, no dependencies) builds the grid
for the filtered, sorted rows a page at a time (``loading="lazy"`` thumbnails, a "show more" button).

The filters, sort and page live in the URL fragment, so a view is a link: ``gallery.html#class=coat&sort=signal``
(keys ``class``, ``condition`` (the condition's folder name), ``seed``, ``round``, ``weight``, ``sort``
(``signal``, ``p_class``, ``weight``, ``round``, ``file`` for manifest order), ``order`` (``desc``, the default,
or ``asc``), ``n`` (page size, default 200) and ``lazy=0`` (load every thumbnail of the page at once).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from pathlib import Path
from urllib.parse import quote

from markupsafe import Markup

from ..data.store import SyntheticStore
from .load import RunData, condition_dirname, configured_conditions, seed_dirs

GALLERY = "gallery.html"
MAX_ROWS = 100_000  # more rows than this are thinned to every k-th one (a uniform sample), said on the page
COLUMNS = ("store", "path", "id", "class", "condition", "seed", "round", "weight", "signal", "p_class", "pred",
           "signal_name", "image_seed")
SORTS = (("signal", "signal"), ("p_class", "P(class)"), ("weight", "weight"), ("round", "round"),
         ("file", "manifest order"))
FILTERS = ("class", "condition", "seed", "round", "weight")
AT = {k: i for i, k in enumerate(COLUMNS)}


def _number(text: str | None, kind: type = float) -> float | int | None:
    """A manifest field as a number; empty, unparsable or non-finite as ``None`` (JSON has no NaN)."""
    try:
        value = kind(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is None or math.isfinite(value) else None


def _link(target: Path, start: Path) -> str:
    """``target`` as a URL relative to the folder ``start`` (symlinks kept as named), else a ``file:`` URI."""
    try:
        rel = os.path.relpath(target.absolute(), start.absolute())
    except ValueError:  # another drive (Windows)
        return target.absolute().as_uri()
    return quote(Path(rel).as_posix()) + "/"


def _condition_label(run: RunData, text: str) -> str:
    """``+ LTG (total, w=1) synthetic`` -> ``LTG (total, w=1)``: short enough for a caption."""
    return run.condition_label(text).removeprefix("+ ").removesuffix(" synthetic")


def _stores(run: RunData) -> list[tuple[Path, int | None, str | None]]:
    """Each synthetic store with its seed and condition text: ``(folder, seed, condition)``; a ``generate``
    output is one store, the run folder, without either."""
    if run.kind == "generate":
        return [(run.root, None, None)]
    texts = [*run.conditions, *configured_conditions(run.config, run.metrics)]
    by_dir = {condition_dirname(t): t for t in reversed(texts)}  # the first text of each folder wins
    order = list(dict.fromkeys(texts))
    found = []
    for seed in sorted(seed_dirs(run.root)):
        for folder in (run.root / f"seed_{seed}" / "mining").glob("*/synthetic"):
            if folder.is_dir():
                found.append((folder, seed, by_dir.get(folder.parent.name, folder.parent.name)))

    def rank(store: tuple[Path, int | None, str | None]) -> tuple:
        _, seed, text = store
        return (order.index(text) if text in order else len(order), text, seed)

    return sorted(found, key=rank)


def gallery_data(run: RunData, where: Path, max_rows: int = MAX_ROWS) -> dict | None:
    """The gallery's rows and filter options for a page written into the folder ``where``; ``None`` when the run
    has no synthetic image yet."""
    stores, conditions, rows = [], [], []
    classes: dict[int, str] = {}
    signals: list[str] = []
    for folder, seed, text in _stores(run):
        found = SyntheticStore(folder).rows()
        if not found:
            continue
        key = condition_dirname(text) if text is not None else "generated"
        if key not in [k for k, _ in conditions]:
            conditions.append((key, _condition_label(run, text) if text is not None else "generated"))
        cond = [k for k, _ in conditions].index(key)
        stores.append(_link(folder, where))
        for r in found:
            class_id = _number(r.get("class_id"), int)
            if class_id is None:  # no class id recorded: one negative id per class name
                class_id = next((c for c, n in classes.items() if c < 0 and n == r["class_name"]), -len(classes) - 1)
            classes.setdefault(class_id, r["class_name"])
            name = r.get("signal_name") or ""
            if name not in signals:
                signals.append(name)
            rows.append([
                len(stores) - 1, quote(r["path"]), r["id"], class_id, cond, seed,
                _number(r.get("round"), int), _number(r.get("weight")), _number(r.get("signal")),
                _number(r.get("p_class")), _number(r.get("pred"), int), signals.index(name),
                _number(r.get("seed"), int),
            ])
    if not rows:
        return None
    total, step = len(rows), max(1, math.ceil(len(rows) / max_rows))
    rows = rows[::step]
    preds = {p for row in rows if (p := row[AT["pred"]]) is not None and p >= 0}
    names = {p: run.class_name(p) for p in preds} | classes  # the manifest's name of each class wins

    def options(column: str, text=str) -> list[tuple[str, str]]:
        values = sorted({row[AT[column]] for row in rows if row[AT[column]] is not None})
        return [(_value(v), text(v)) for v in values]

    filters = {
        "class": [(n, n) for n in dict.fromkeys(names[c] for c in sorted({row[AT["class"]] for row in rows}))],
        "condition": [conditions[i] for i in sorted({row[AT["condition"]] for row in rows})],
        "seed": options("seed"),
        "round": options("round"),
        "weight": options("weight", lambda w: f"{w:g}"),
    }
    data = {
        "columns": COLUMNS,
        "stores": stores,
        "classes": {str(c): n for c, n in names.items()},
        "conditions": conditions,
        "signals": signals,
        "sorts": [k for k, _ in SORTS if k != "file"],
        "rows": rows,
    }
    return {"data": data, "filters": filters, "total": total, "shown": len(rows), "step": step,
            "signals": [s for s in signals if s]}


def _value(v: float) -> str:
    """A number as a filter's value: short (``1``, not ``1.0``), yet read back (``Number``) as exactly ``v``."""
    short = f"{v:g}"
    return short if float(short) == v else json.dumps(v)


def _json_script(data: object) -> Markup:
    """JSON safe inside ``<script>``: ``<``, ``>`` and ``&`` escaped (no ``</script>`` can end it early)."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def build_gallery(run: RunData, where: Path, report: str = "report.html", max_rows: int = MAX_ROWS) -> str | None:
    """The gallery page for a file in the folder ``where`` (image paths are relative to it), linking back to
    ``report`` (a URL); ``None`` when the run has no synthetic image."""
    from .page import environment

    found = gallery_data(run, where, max_rows)
    if found is None:
        return None
    env = environment()
    script = env.loader.get_source(env, "gallery.js")[0]  # plain text: never parsed as a template
    return env.get_template("gallery.html.j2").render(
        g=found,
        rows=_json_script(found["data"]),
        script=Markup(script),
        filters=[(key, found["filters"][key]) for key in FILTERS],
        sorts=SORTS,
        name=run.root.absolute().name,
        report=report,
        stamp=dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
    )


def write_gallery(run: RunData, path: str | Path, report: str = "report.html") -> Path | None:
    """Write the gallery to ``path`` (atomically); returns it, or ``None`` (nothing written) without images."""
    path = Path(path)
    html = build_gallery(run, path.parent, report)
    if html is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path
