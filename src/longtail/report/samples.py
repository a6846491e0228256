"""Sections on generated images: the guidance sweep, its grids, mined synthetic data, a ``longtail generate``
output, and a ``longtail calibrate`` output's weight choice."""

from __future__ import annotations

from collections.abc import Callable

from .cells import Cell, Image, Table, fmt, fmt_ms, image, mean_of, num, numf, shrink_png
from .load import RunData, manifest_rows
from .plots import MONTAGE_CLASSES, montage, plot_by_weight, plot_grid, plot_montages, plot_sweep


def _choice_weight(choice: dict) -> Cell | str:
    return num(f"{choice['weight']:g}") if choice.get("weight") is not None else "none passed"


def _classifier(run: RunData, mine: str) -> str:
    """Which classifier generated and scored the sweep's images."""
    return "the classifier being calibrated" if run.kind == "calibrate" else mine


def _choices(sweep: dict) -> Table | None:
    rows = [
        [s, _choice_weight(c), c.get("baseline_signal"), c.get("baseline_p_class"), c.get("reason", "")]
        for s, c in (sweep.get("choices") or {}).items()
    ]
    headers = ["signal", "chosen weight", "unguided signal", "unguided P(class)", "reason"]
    return Table(headers, rows) if rows else None


def _timing(sweep: dict) -> Table | None:
    timing = sweep.get("timing") or {}
    keys = ("unguided_img_per_s", "guided_img_per_s", "slowdown")
    rows = [[numf(timing.get(k)) for k in keys]]
    return Table(["unguided img/s", "guided img/s", "slowdown (x)"], rows) if timing else None


def section_sweep(run: RunData) -> dict | None:
    """Signal and P(class) against the guidance weight (Figure 2), weight choices, generation speed."""
    sw = run.sweep or {}
    if not sw.get("points"):
        return None
    points = [
        [
            p["signal"],
            num(f"{p['weight']:g}"),
            p.get("mean_signal"),
            p.get("mean_p_class"),
            p.get("accuracy"),
            p.get("n"),
            numf(p["n"] / p["seconds"] if p.get("seconds") and p.get("n") else None),
            p.get("nonfinite"),
        ]
        for p in sw["points"]
    ]
    headers = ["signal", "weight", "mean signal", "P(class)", "accuracy", "images", "img/s", "non-finite"]
    return {
        "scored_by": _classifier(run, "the base classifier (first seed)"),
        "plot": image(plot_sweep(sw), "sweep"),
        "points": Table(headers, points),
        "choices": _choices(sw),
        "timing": _timing(sw),
    }


def section_grids(run: RunData) -> dict | None:
    """The sweep's image grids: the paper's Figure 6 analog."""
    grids = sorted(run.grid_dir.glob("grid_*.png"))
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
    }


def _floats(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def _agreement(rows: list[dict[str, str]]) -> float | None:
    agree = [r["pred"] == r["class_id"] for r in rows if r.get("pred") not in (None, "")]
    return sum(agree) / len(agree) if agree else None


def _round(row: dict[str, str]) -> int:
    return int(row.get("round") or 0)


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
    found = {k: manifest_rows(d) for k, d in stores.items() if (d / "manifest.csv").is_file()}
    found = {k: v for k, v in found.items() if v}
    if not found:
        return None
    body = []
    for (seed, cond), rows in found.items():
        for rnd in sorted({_round(r) for r in rows}):
            sel = [r for r in rows if _round(r) == rnd]
            body.append(
                [
                    seed,
                    cond,
                    rnd,
                    len(sel),
                    sel[0].get("signal_name") or "–",
                    sel[0].get("weight") or "–",
                    mean_of(_floats(sel, "signal")),
                    mean_of(_floats(sel, "p_class")),
                    _agreement(sel),
                ]
            )
    seed = min(s for s, _ in found)
    montages = {
        run.condition_label(c): montage(stores[(s, c)], rows, len(run.class_names))
        for (s, c), rows in found.items()
        if s == seed
    }
    headers = [
        "seed",
        "condition",
        "round",
        "images",
        "signal",
        "weight",
        "mean signal",
        "mean P(class)",
        "classified as intended",
    ]
    return {
        "table": Table(headers, body),
        "seed": seed,
        "montage": _montage_image(montages, run.class_names, "synthetic samples"),
    }


def _weight(row: dict[str, str]) -> float:
    try:
        return float(row.get("weight") or 0.0)
    except ValueError:
        return 0.0


def _by(rows: list[dict[str, str]], key: Callable[[dict[str, str]], object]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return dict(sorted(out.items()))


def _weight_rows(rows: list[dict[str, str]]) -> list[list]:
    out = []
    for w, sel in _by(rows, _weight).items():
        seconds = mean_of(_floats(sel, "seconds"))
        out.append(
            [
                num(f"{w:g}"),
                sel[0].get("signal_name") or "–",
                len(sel),
                fmt_ms(_floats(sel, "signal")),
                fmt_ms(_floats(sel, "p_class")),
                _agreement(sel),
                numf(1 / seconds if seconds else None),
            ]
        )
    return out


def _class_rows(run: RunData, rows: list[dict[str, str]]) -> list[list]:
    return [
        [
            run.class_name(c),
            len(sel),
            mean_of(_floats(sel, "signal")),
            mean_of(_floats(sel, "p_class")),
            _agreement(sel),
        ]
        for c, sel in _by(rows, lambda r: int(r["class_id"])).items()
    ]


def _weight_plot(rows: list[dict[str, str]]) -> Image | None:
    """Mean signal and P(class) per weight, when the images were scored at two weights or more."""
    scored = _by([r for r in rows if r.get("signal") not in (None, "")], _weight)
    if len(scored) < 2:
        return None
    stats = {
        w: {"signal": mean_of(_floats(s, "signal")), "p_class": mean_of(_floats(s, "p_class"))}
        for w, s in scored.items()
    }
    signal = next((r["signal_name"] for r in rows if r.get("signal_name")), "signal")
    return image(plot_by_weight(stats, signal), "signal and P(class) per weight")


def _generated_montage(run: RunData, rows: list[dict[str, str]]) -> dict | None:
    """A few images per class (the classes present, however few of the label set) and weight."""
    present = sorted({int(r["class_id"]) for r in rows})
    dense = [{**r, "class_id": str(present.index(int(r["class_id"])))} for r in rows]
    montages = {
        f"w = {w:g}" if w else "unguided": montage(run.root, sel, len(present), per_class=4)
        for w, sel in _by(dense, _weight).items()
    }
    return _montage_image(montages, [run.class_name(c) for c in present], "generated samples")


def section_generated(run: RunData) -> dict | None:
    """A ``longtail generate`` output: images per class, signal and P(class) per weight, a few images."""
    rows = run.manifest
    if not rows:
        return None
    per_weight = [
        "weight",
        "signal",
        "images",
        "mean signal",
        "mean P(class)",
        "classified as intended",
        "img/s",
    ]
    per_class = ["class", "images", "mean signal", "mean P(class)", "classified as intended"]
    return {
        "n": len(rows),
        "scored": any(r.get("signal") not in (None, "") for r in rows),
        "models": ", ".join(sorted({r.get("model") or "" for r in rows} - {""})),
        "classes": Table(per_class, _class_rows(run, rows)),
        "weights": Table(per_weight, _weight_rows(rows)),
        "plot": _weight_plot(rows),
        "montage": _generated_montage(run, rows),
    }


def _at(points: list[dict], signal: str, weight: float | None) -> dict:
    return next((p for p in points if p["signal"] == signal and p["weight"] == weight), {})


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
        chosen = _at(points, sig, c.get("weight"))
        rows.append(
            [
                sig,
                _choice_weight(c),
                _arrow(c.get("baseline_signal"), chosen.get("mean_signal")),
                _arrow(c.get("baseline_p_class"), chosen.get("mean_p_class")),
                c.get("reason", ""),
            ]
        )
    config = run.config or {}
    settings = [
        [k, str(config[k])] for k in ("signals", "weights", "per_class", "min_p_ratio", "seed") if k in config
    ]
    return {
        "choices": Table(
            [
                "signal",
                "chosen weight",
                "signal: unguided → chosen",
                "P(class): unguided → chosen",
                "reason",
            ],
            rows,
        ),
        "images": max((p.get("n") or 0 for p in points), default=0),
        "classes": ", ".join(run.class_names),
        "settings": Table(["setting", "value"], settings, "narrow") if settings else None,
    }
