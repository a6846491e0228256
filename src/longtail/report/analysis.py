"""Optional sections, left out when their file is absent: synthetic vs real distribution, the denoising
trajectory, longtail introspection."""

from __future__ import annotations

from functools import reduce
from math import nan
from operator import getitem

from .cells import Cell, Table, fmt, fmt_ms, image, json_text, num
from .load import RunData
from .plots import plot_distribution, plot_trajectory

METRICS = {"fid": "FID", "precision": "precision", "recall": "recall"}
BETWEEN = ("fid_mean", "fid_min", "precision_mean", "recall_mean")


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
