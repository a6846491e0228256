"""Optional sections, left out when their file or key is absent: nuisance modes in the synthetic data,
synthetic vs real distribution, the denoising trajectory, longtail introspection."""

from __future__ import annotations

from functools import reduce
from math import nan
from operator import getitem

from .cells import Cell, Table, fmt, fmt_ms, image, json_text, num, numf
from .load import RunData
from .plots import plot_distribution, plot_trajectory

METRICS = {"fid": "FID", "precision": "precision", "recall": "recall"}
BETWEEN = ("fid_mean", "fid_min", "precision_mean", "recall_mean")
DETECTOR_KEYS = ("accuracy", "clean_false_alarm", "n")
RATES_ROW = "real training data: rate set in data.nuisance"
RECALL_ROW = "mode detector: recall on the test set"


def _shares_row(label: str | Cell, shares: object, modes: list[str]) -> list:
    """``label`` and ``shares[mode]`` (3 decimals; a dash when absent) for each of ``modes``."""
    shares = shares if isinstance(shares, dict) else {}
    return [label, *[numf(shares.get(m), ".3f") for m in modes]]


def _class_order(run: RunData, names: list[str]) -> list[str]:
    """``names`` in the run's class order; names it does not know last, as given."""
    known = {n: i for i, n in enumerate(run.class_names)}
    return sorted(names, key=lambda n: known.get(n, len(known)))


def _mode_classes(run: RunData, label: str, shares: dict, modes: list[str]) -> dict:
    """One condition's shares per class (class x mode)."""
    classes = _class_order(run, [k for k, v in shares.items() if k != "all" and isinstance(v, dict)])
    return {
        "label": label,
        "table": Table(["class", *modes], [_shares_row(c, shares[c], modes) for c in classes]),
    }


def _reference_rows(run: RunData, detector: dict | None, modes: list[str]) -> list[list]:
    """Rows to read the shares against: the real training data's configured rates (``data.nuisance``) and the
    mode detector's recall on the test set."""
    rates = ((run.config or {}).get("data") or {}).get("nuisance")
    rows = []
    if isinstance(rates, dict) and rates:
        rows.append(_shares_row(Cell(RATES_ROW, span="meta"), rates, modes))
    if detector is not None:
        rows.append(_shares_row(Cell(RECALL_ROW, span="meta"), detector.get("recall"), modes))
    return rows


def section_modes(run: RunData) -> dict | None:
    """``metrics.json``'s ``mode_shares`` (``{condition: {"all" | class name: {mode: share}}}``): how often
    each nuisance mode shows in each condition's synthetic data (all seeds pooled), as ``mode_detector`` (its
    ``{"accuracy", "clean_false_alarm", "recall", "n"}``) or, without one, the attribute captioner sees it."""
    metrics = run.metrics or {}
    raw = metrics.get("mode_shares")
    raw = raw if isinstance(raw, dict) else {}
    shares = {c: s for c, s in raw.items() if isinstance(s, dict) and isinstance(s.get("all"), dict)}
    if not shares:
        return None
    detector = metrics.get("mode_detector") if isinstance(metrics.get("mode_detector"), dict) else None
    modes = list(dict.fromkeys(str(m) for s in shares.values() for m in s["all"]))
    labels = {c: run.condition_label(c) for c in shares}
    rows = [_shares_row(labels[c], s["all"], modes) for c, s in shares.items()]
    return {
        "detector": {k: fmt(detector.get(k)) for k in DETECTOR_KEYS} if detector else None,
        "table": Table(["condition", *modes], [*rows, *_reference_rows(run, detector, modes)]),
        "per_class": [_mode_classes(run, labels[c], s, modes) for c, s in shares.items()],
    }


def distribution_reports(data: dict) -> dict[str, list[dict]]:
    """``distribution.json`` -> label -> reports (one per seed): the demo's ``{"conditions": {condition:
    {seed: report}}}``, a single ``distribution_report`` or a mapping ``name -> report``."""
    if "per_class" in data:
        return {"synthetic": [data]}
    if isinstance(data.get("conditions"), dict):
        return {
            c: [r for r in per_seed.values() if isinstance(r, dict) and "per_class" in r]
            for c, per_seed in data["conditions"].items()
            if isinstance(per_seed, dict)
        }
    return {k: [v] for k, v in data.items() if isinstance(v, dict) and "per_class" in v}


def _ms(reports: list[dict], *keys: str) -> Cell:
    """``mean ± std`` over seeds of ``report[keys[0]]...[keys[-1]]`` (only the last key may be absent)."""
    return fmt_ms([reduce(getitem, keys[:-1], r).get(keys[-1]) for r in reports])


def _overall_row(label: str, reps: list[dict]) -> list:
    refs = [
        [_ms(reps, "reference", f"{side}_{m}_mean").text for side in ("within", "between")] for m in METRICS
    ]
    below = sum(bool(r["reference"].get("fid_below_between")) for r in reps)
    overall = [_ms(reps, "overall", m) for m in METRICS]
    n_real = reps[0]["overall"].get("n_real")
    return [
        label,
        len(reps),
        n_real,
        *overall,
        *[num(" / ".join(r)) for r in refs],
        f"{below} of {len(reps)}",
    ]


def _per_class(label: str, reps: list[dict]) -> dict:
    rows = [
        [c, _ms(reps, "per_class", c, "n_fake"), *[_ms(reps, "per_class", c, m) for m in METRICS]]
        + [_ms(reps, "per_class", c, "between_real", m) for m in BETWEEN]
        for c in reps[0]["per_class"]
    ]
    headers = ["class", "synthetic", *METRICS.values(), "between FID mean", "between FID min"]
    table = Table([*headers, "between precision", "between recall"], rows)
    return {
        "label": label,
        "dim": fmt(reps[0].get("feature_dim")),
        "k": fmt(reps[0].get("k")),
        "table": table,
    }


def section_distribution(run: RunData) -> dict | None:
    """``distribution.json``: FID and precision / recall of synthetic vs real data (sections 3.1, 6)."""
    data = run.json("distribution.json")
    if data is None:
        return None
    reports = {k: v for k, v in (distribution_reports(data) if isinstance(data, dict) else {}).items() if v}
    if not reports:
        return {"unrecognised": json_text(data)}
    labels = {k: run.condition_label(k).removeprefix("+ ") if k in run.conditions else k for k in reports}
    headers = ["synthetic set", "seeds", "real images", *METRICS.values()]
    headers += [f"{h}: synthetic within class / real between classes" for h in METRICS.values()]
    rows = [_overall_row(labels[k], r) for k, r in reports.items()]
    features = data.get("features")
    return {
        "features": features if isinstance(features, str) else None,
        "table": Table([*headers, "FID within < between (seeds)"], rows),
        "plot": image(plot_distribution(reports, labels), "distribution"),
        "per_class": [_per_class(labels[k], r) for k, r in reports.items()],
    }


def trajectory_columns(data: object) -> dict[str, list[float]]:
    """``{"rows": [{step, fraction, fid_*, signal_*}, ...]}``, a bare list of rows, or ``{key: [values]}``."""
    rows = data.get("rows") if isinstance(data, dict) else data
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        keys = [k for k, v in rows[0].items() if isinstance(v, int | float)]
        return {k: [float(x) if isinstance(x := r.get(k), int | float) else nan for r in rows] for k in keys}
    if isinstance(data, dict):
        return {
            k: [float(x) for x in v]
            for k, v in data.items()
            if isinstance(v, list) and v and all(isinstance(x, int | float) for x in v)
        }
    return {}


def section_trajectory(run: RunData) -> dict | None:
    """``trajectory.json`` (A.7, Figure 15): is the guidance input in distribution along the trajectory?"""
    data = run.json("trajectory.json")
    if data is None:
        return None
    cols = trajectory_columns(data)
    xkey = next((k for k in ("fraction", "step", "t", "timestep") if k in cols), None)
    if xkey is None or len(cols) < 2:
        return {"unrecognised": json_text(data)}
    meta = data if isinstance(data, dict) else {}
    signal, weight = meta.get("signal", "signal"), meta.get("weight")
    guided = f"guided ({signal}, w = {weight:g})" if isinstance(weight, int | float) else "guided"
    steps = len(cols[xkey])
    return {
        "images": fmt(meta["images"]) if "images" in meta else None,
        "plot": image(plot_trajectory(cols, xkey, guided), "trajectory"),
        "steps": steps,
        "table": Table(list(cols), [[cols[k][i] for k in cols] for i in range(steps)]),
    }


def keyword_node(value: object, limit: int = 8) -> dict:
    """A keyword file's value as a tree the template draws: ``text``, ``items`` (+ ``more``) or ``pairs``."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return {"text": ", ".join(value)}
    if isinstance(value, list):
        return {"items": [keyword_node(v, limit) for v in value[:limit]], "more": max(0, len(value) - limit)}
    if isinstance(value, dict):
        return {"pairs": [(str(k), keyword_node(v, limit)) for k, v in value.items()]}
    return {"text": str(value)}


def section_introspection(run: RunData) -> dict | None:
    """``introspection/*.json`` (section 5): longtail keywords and refined prompts per class."""
    folder = run.root / "introspection"
    files = sorted(folder.glob("*.json"), key=lambda p: (p.name != "keywords.json", p.name))
    if not files:
        return None
    out = []
    for path in files:
        data = run.json(path)
        if isinstance(data, dict) and data:
            out.append({"name": path.name, "rows": [(str(k), keyword_node(v)) for k, v in data.items()]})
        else:
            out.append({"name": path.name, "raw": json_text(data)})
    return {"files": out}
