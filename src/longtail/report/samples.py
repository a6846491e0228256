"""Sections on generated images: the guidance sweep, its grids, mined synthetic data, a ``longtail generate``
output, and a ``longtail calibrate`` output's weight choice."""

from __future__ import annotations

from collections.abc import Callable

from ..data.store import SyntheticStore
from .cells import DASH, Cell, Image, Table, cell, fmt, fmt_ms, image, mean_of, num, numf, shrink_png
from .load import RunData
from .plots import MONTAGE_CLASSES, montage, plot_by_weight, plot_grid, plot_montages, plot_sweep

SCORED = ["mean signal", "mean P(class)", "classified as intended"]


def _choice_weight(choice: dict) -> Cell | str:
    return num(f"{choice['weight']:g}") if choice.get("weight") is not None else "none passed"


def _classifier(run: RunData, mine: str) -> str:
    """Which classifier generated and scored the sweep's images."""
    return "the classifier being calibrated" if run.kind == "calibrate" else mine


def section_sweep(run: RunData) -> dict | None:
    """Signal and P(class) against the guidance weight (Figure 2), weight choices, generation speed."""
    sw = run.sweep or {}
    if not sw.get("points"):
        return None
    keys = ("mean_signal", "mean_p_class", "accuracy", "n")
    points = []
    for p in sw["points"]:
        rate = numf(p["n"] / p["seconds"] if p.get("seconds") and p.get("n") else None)
        points.append(
            [p["signal"], num(f"{p['weight']:g}"), *[p.get(k) for k in keys], rate, p.get("nonfinite")]
        )
    choices = [
        [s, _choice_weight(c), c.get("baseline_signal"), c.get("baseline_p_class"), c.get("reason", "")]
        for s, c in (sw.get("choices") or {}).items()
    ]
    timing = sw.get("timing") or {}
    speed = [[numf(timing.get(k)) for k in ("unguided_img_per_s", "guided_img_per_s", "slowdown")]]
    headers = ["signal", "weight", "mean signal", "P(class)", "accuracy", "images", "img/s", "non-finite"]
    choice_headers = ["signal", "chosen weight", "unguided signal", "unguided P(class)", "reason"]
    return {
        "scored_by": _classifier(run, "the base classifier (first seed)"),
        "plot": image(plot_sweep(sw), "sweep"),
        "points": Table(headers, points),
        "choices": Table(choice_headers, choices) if choices else None,
        "timing": Table(["unguided img/s", "guided img/s", "slowdown (x)"], speed) if timing else None,
    }


def section_grids(run: RunData) -> dict | None:
    """The sweep's image grids: the paper's Figure 6 analog."""
    grids = sorted(p for p in run.grid_dir.glob("grid_*.png") if p.name != OPTIONS_GRID)
    if not grids:
        return None
    weights = (run.sweep or {}).get("grid_weights") or []
    figures = []
    for path in grids:
        png = path.read_bytes()
        drawn = plot_grid(png, run.class_names, weights) if weights else shrink_png(png)
        signal = path.stem.removeprefix("grid_")
        figures.append({"image": image(drawn, f"grid {signal}", cls="pixel"), "signal": signal})
    columns = ", ".join("unguided" if w == 0 else f"w = {w:g}" for w in weights)
    return {
        "columns": columns or "unguided, then increasing weights",
        "generated_with": _classifier(run, "the base classifier of the first seed"),
        "figures": figures,
        "options": _options(run),
    }


OPTIONS_GRID = "grid_options.png"


def _options(run: RunData) -> dict | None:
    """The guidance options compared at the chosen weight (``sweep.options``): their grid (one column per
    option) and a row each with signal, P(class), judge columns and cost relative to unguided sampling."""
    options = (run.sweep or {}).get("options")
    path = run.grid_dir / OPTIONS_GRID
    if not isinstance(options, dict) or not path.is_file():
        return None
    columns = [str(c) for c in options.get("columns") or []]
    png = path.read_bytes()
    drawn = plot_grid(png, run.class_names, columns) if columns else shrink_png(png)
    points = run.sweep.get("points") or []
    unguided = next((p for p in points if p.get("weight") == 0 and p.get("signal") == options.get("signal")), None)
    plain = next((p for p in points if p.get("weight") == options.get("weight")
                  and p.get("signal") == options.get("signal")), None)
    per_image = (unguided["seconds"] / unguided["n"]) if unguided and unguided.get("n") else None

    def row(name: str, p: dict | None) -> list:
        if p is None:
            return [name, DASH, DASH, DASH, DASH, DASH]
        cost = p["seconds"] / p["n"] / per_image if per_image and p.get("n") else None
        return [name, cell(p.get("mean_signal")), cell(p.get("mean_p_class")), cell(p.get("judge_accuracy")),
                cell(p.get("judge_precision")), numf(cost, ".1f") if cost is not None else DASH]

    body = [row("unguided", unguided), row(f"LTG w = {options.get('weight'):g}", plain)]
    body += [row(str(p.get("option")), p) for p in options.get("points") or []]
    headers = ["setting", f"{options.get('signal')}", "P(class)", "judge accuracy", "judge precision",
               "cost (x unguided)"]
    return {"image": image(drawn, "guidance options", cls="pixel"), "signal": options.get("signal"),
            "weight": options.get("weight"), "table": Table(headers, body)}


def _floats(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def _scores(rows: list[dict[str, str]], stat: Callable = mean_of) -> list:
    """``stat`` of the signal and of P(class), and the share classified as the intended class (``SCORED``)."""
    agree = [r["pred"] == r["class_id"] for r in rows if r.get("pred") not in (None, "")]
    share = sum(agree) / len(agree) if agree else None
    return [stat(_floats(rows, "signal")), stat(_floats(rows, "p_class")), share]


def _weight(row: dict[str, str]) -> float:
    try:
        return float(row.get("weight") or 0.0)
    except ValueError:
        return 0.0


def _by(rows: list[dict[str, str]], key: Callable[[dict[str, str]], object]) -> dict:
    """``rows`` grouped by ``key``, sorted."""
    out: dict = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return dict(sorted(out.items()))


def _montage_image(montages: dict[str, object], class_names: list[str], alt: str) -> dict | None:
    """The montages as one inlined figure, and how many classes it shows."""
    montages = {k: v for k, v in montages.items() if v is not None}
    if not montages:
        return None
    return {
        "image": image(plot_montages(montages, class_names), alt, cls="pixel"),
        "first": MONTAGE_CLASSES if len(class_names) > MONTAGE_CLASSES else None,
        "num_classes": len(class_names),
    }


def section_synthetic(run: RunData) -> dict | None:
    """What the mining loop generated: scores recorded at generation time, and the last round's images."""
    stores = {(s, c): run.store_dir(s, c) for s in run.seeds for c in run.conditions}
    found = {k: SyntheticStore(d).rows() for k, d in stores.items() if (d / "manifest.csv").is_file()}
    found = {k: v for k, v in found.items() if v}
    if not found:
        return None
    body = [
        [
            seed,
            cond,
            rnd,
            len(sel),
            *[sel[0].get(k) or DASH for k in ("signal_name", "weight")],
            *_scores(sel),
        ]
        for (seed, cond), rows in found.items()
        for rnd, sel in _by(rows, lambda r: int(r.get("round") or 0)).items()
    ]
    seed = min(s for s, _ in found)
    montages = {
        run.condition_label(c): montage(stores[(s, c)], rows, len(run.class_names))
        for (s, c), rows in found.items()
        if s == seed
    }
    return {
        "table": Table(["seed", "condition", "round", "images", "signal", "weight", *SCORED], body),
        "seed": seed,
        "montage": _montage_image(montages, run.class_names, "synthetic samples"),
        "gallery": run.gallery,
        "n": sum(len(rows) for rows in found.values()),
    }


def section_generated(run: RunData) -> dict | None:
    """A ``longtail generate`` output: images per class, signal and P(class) per weight, a few images."""
    rows = run.manifest
    if not rows:
        return None
    weights = []
    for w, sel in _by(rows, _weight).items():
        seconds = mean_of(_floats(sel, "seconds"))
        rate = numf(1 / seconds if seconds else None)
        weights.append(
            [num(f"{w:g}"), sel[0].get("signal_name") or DASH, len(sel), *_scores(sel, fmt_ms), rate]
        )
    classes = [[run.class_name(c), len(sel), *_scores(sel)] for c, sel in _by(rows, _class_id).items()]
    return {
        "n": len(rows),
        "scored": any(r.get("signal") not in (None, "") for r in rows),
        "models": ", ".join(sorted({r.get("model") or "" for r in rows} - {""})),
        "classes": Table(["class", "images", *SCORED], classes),
        "weights": Table(["weight", "signal", "images", *SCORED, "img/s"], weights),
        "plot": _weight_plot(rows),
        "montage": _generated_montage(run, rows),
        "gallery": run.gallery,
    }


def _class_id(row: dict[str, str]) -> int:
    return int(row["class_id"])


def _weight_plot(rows: list[dict[str, str]]) -> Image | None:
    """Mean signal and P(class) per weight, when the images were scored at two weights or more."""
    scored = _by([r for r in rows if r.get("signal") not in (None, "")], _weight)
    if len(scored) < 2:
        return None
    stats = {w: dict(zip(("signal", "p_class"), _scores(sel)[:2], strict=True)) for w, sel in scored.items()}
    signal = next((r["signal_name"] for r in rows if r.get("signal_name")), "signal")
    return image(plot_by_weight(stats, signal), "signal and P(class) per weight")


def _generated_montage(run: RunData, rows: list[dict[str, str]]) -> dict | None:
    """A few images per class (the classes present, however few of the label set) and weight."""
    present = sorted({_class_id(r) for r in rows})
    dense = [{**r, "class_id": str(present.index(_class_id(r)))} for r in rows]
    montages = {
        f"w = {w:g}" if w else "unguided": montage(run.root, sel, len(present), per_class=4)
        for w, sel in _by(dense, _weight).items()
    }
    return _montage_image(montages, [run.class_name(c) for c in present], "generated samples")


def _arrow(before: object, after: object) -> Cell:
    return num(f"{fmt(before)} → {fmt(after)}" if after is not None else fmt(before))


def section_calibration(run: RunData) -> dict | None:
    """A ``longtail calibrate`` output: the weight chosen per signal, with the numbers behind the choice."""
    choices = (run.sweep or {}).get("choices") or {}
    if not choices:
        return None
    points = run.sweep.get("points") or []
    rows = []
    for sig, c in choices.items():
        chosen = next((p for p in points if p["signal"] == sig and p["weight"] == c.get("weight")), {})
        shifts = [_arrow(c.get(f"baseline_{k}"), chosen.get(f"mean_{k}")) for k in ("signal", "p_class")]
        rows.append([sig, _choice_weight(c), *shifts, c.get("reason", "")])
    config = run.config or {}
    keys = ("signals", "weights", "per_class", "min_p_ratio", "seed")
    settings = [[k, str(config[k])] for k in keys if k in config]
    headers = [
        "signal",
        "chosen weight",
        "signal: unguided → chosen",
        "P(class): unguided → chosen",
        "reason",
    ]
    return {
        "choices": Table(headers, rows),
        "images": max((p.get("n") or 0 for p in points), default=0),
        "classes": ", ".join(run.class_names),
        "settings": Table(["setting", "value"], settings, "narrow") if settings else None,
    }
