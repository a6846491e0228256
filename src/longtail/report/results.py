"""Sections on a run's classifiers: overview (with compute time by stage), accuracy by group, paired
differences, the nuisance test splits, the data-efficiency curve, accuracy per round, detection."""

from __future__ import annotations

import math

from .cells import DASH, Cell, Table, fmt_duration, fmt_ms, fmt_stat, image, num, numf
from .load import RunData
from .plots import GROUP_KEYS, GROUP_LABELS, Rows, plot_accuracy_bars, plot_efficiency, plot_roc, plot_rounds

OPTIONAL_FILES = ("efficiency.json", "distribution.json", "trajectory.json", "introspection")


def _status(name: str, value: str, bad: bool = False) -> list[Cell]:
    return [Cell(name), Cell(value, span="bad" if bad else "ok")]


def _stages(run: RunData) -> list[list[Cell]]:
    """What the run has produced so far, per stage of its kind."""
    points = len((run.sweep or {}).get("points", []))
    if run.kind == "calibrate":
        grids = len(list(run.grid_dir.glob("grid_*.png")))
        return [
            _status("calibration.json", f"{points} points" if run.sweep else "missing", not run.sweep),
            _status("grids", f"{grids} signal(s)" if grids else "missing", not grids),
        ]
    if run.kind == "generate":
        classes = len({r["class_id"] for r in run.manifest})
        rows = [_status("manifest.csv", f"{len(run.manifest)} images, {classes} classes", not run.manifest)]
        if parts := len(list(run.root.glob("manifest.part-*.csv"))):
            rows.append(_status("unmerged part files", f"{parts} (the run has not finished)", True))
        return rows
    rows = [_status("base classifiers", f"seeds {sorted(run.base)}" if run.base else "missing", not run.base)]
    sweep_off = (run.config or {}).get("sweep", {}).get("signals") == []  # switched off, not missing
    rows.append(_status("guidance sweep", f"{points} points" if run.sweep else
                        "off (set sweep.signals to run it)" if sweep_off else "missing", not (run.sweep or sweep_off)))
    for cond in run.conditions:
        done = {s: len(run.mining[s][cond]) - 1 for s in run.seeds if cond in run.mining.get(s, {})}
        rows.append(_status(f"mining: {cond}", ", ".join(f"seed {s}: {r} rounds" for s, r in done.items())))
    if not run.conditions:
        rows.append(_status("mining", "missing", True))
    rows.append(_status("summary (metrics.json)", "present" if run.metrics else "missing", not run.metrics))
    for name in OPTIONAL_FILES:
        rows.append(_status(name, "present" if (run.root / name).exists() else "not produced (optional)"))
    return rows


def _seconds(value: object) -> float | None:
    """A finite, non-negative number of seconds, else ``None``."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok and value >= 0 else None


def _timing_rows(stages: dict[str, float], total: float | None) -> list[list[Cell]]:
    """``stage, seconds, share of the total`` per stage, then the rest of the total (set-up...), then it."""
    whole = total if total is not None else sum(stages.values())
    rest = total - sum(stages.values()) if total is not None else 0.0
    shown = {**stages, **({"other (set-up, loading, summary)": rest} if rest >= 0.05 else {})}

    def share(v: float) -> Cell:
        return num(f"{100 * v / whole:.0f}%") if whole > 0 else num(DASH)

    rows = [[Cell(name), numf(v), share(v)] for name, v in shown.items()]
    return [*rows, [Cell("total"), numf(whole), share(whole)]]


def compute_time(metrics: dict | None) -> dict | None:
    """``metrics.json``'s ``seconds`` (the invocation that wrote it) and ``stage_seconds`` (stage -> seconds,
    newer runs): ``{"total": "20 min 44 s" | None, "table": Table | None}``; ``None`` without either."""
    metrics = metrics or {}
    total = _seconds(metrics.get("seconds"))
    raw = metrics.get("stage_seconds")
    raw = raw if isinstance(raw, dict) else {}
    stages = {str(k): v for k, x in raw.items() if (v := _seconds(x)) is not None}
    if total is None and not stages:
        return None
    table = Table(["stage", "seconds", "share"], _timing_rows(stages, total), "narrow") if stages else None
    return {"total": fmt_duration(total if total is not None else sum(stages.values())), "table": table}


def section_overview(run: RunData) -> dict:
    """The printed summary (mine runs) next to the stages found, the compute time and the resolved config."""
    return {
        "show_summary": run.kind == "mine",
        "summary": run.summary_text.rstrip() if run.summary_text else None,
        "config": run.config_text.rstrip() if run.config_text else None,
        "stages": Table(["stage", "status"], _stages(run), "narrow"),
        "timing": compute_time(run.metrics) if run.kind == "mine" else None,
        "problems": list(run.problems),
    }


def base_label(run: RunData) -> str:
    """The base classifier's label: trained on the long-tailed real data, or given (``base.epochs: 0``)."""
    base = (run.config or {}).get("base")
    given = isinstance(base, dict) and base.get("epochs") == 0
    return "base (the given classifier)" if given else "base (long-tailed real data only)"


def accuracy_rows(run: RunData) -> Rows:
    """``(key, label, final metrics per seed)``: the base classifier (trained or given), each condition."""
    label = base_label(run)
    rows = [("base", label, [run.base[s] for s in sorted(run.base)])] if run.base else []
    rows += [(c, run.condition_label(c), [h[-1] for h in run.histories(c)]) for c in run.conditions]
    return [r for r in rows if any(k in f for f in r[2] for k in GROUP_KEYS)]


def _per_class_table(run: RunData, rows: Rows) -> Table | None:
    count = max((len(f.get("per_class", [])) for _, _, finals in rows for f in finals), default=0)
    if count == 0:
        return None
    groups = (run.metrics or {}).get("groups")
    headers = ["class", *(["group"] if groups else []), *[label for _, label, _ in rows]]
    body = []
    for c in range(count):
        cells = [
            fmt_ms([f["per_class"][c] for f in finals if len(f.get("per_class", [])) > c])
            for _, _, finals in rows
        ]
        group = [str(groups[c]) if c < len(groups) else ""] if groups else []
        body.append([run.class_name(c), *group, *cells])
    return Table(headers, body)


def section_accuracy(run: RunData) -> dict | None:
    """Final accuracy per condition, by Many / Medium / Few (paper section 6, Table 3's columns)."""
    rows = accuracy_rows(run)
    if not rows:
        return None
    body = []
    for _, label, finals in rows:
        rounds = sorted({f.get("round", 0) for f in finals})
        shown = DASH if not rounds or rounds == [0] else "/".join(map(str, rounds))
        body.append([label, *[fmt_ms([f.get(k) for f in finals]) for k in GROUP_KEYS], len(finals), shown])
    per_class = _per_class_table(run, rows)
    return {
        "n_seeds": max(len(f) for _, _, f in rows),
        "evaluated_on": (run.metrics or {}).get("evaluated_on"),
        "has_base": bool(run.base),
        "plot": image(plot_accuracy_bars(rows), "accuracy by group"),
        "table": Table(["condition", *[GROUP_LABELS[k] for k in GROUP_KEYS], "seeds", "rounds"], body),
        "per_class": per_class,
        "num_classes": len(per_class.rows) if per_class else 0,
    }


def paired_cell(diff: object) -> Cell:
    """A ``paired_difference`` as ``mean [CI low, CI high] (wins/losses[, n tied])``; a dash if malformed."""
    if not isinstance(diff, dict) or not isinstance(diff.get("mean"), int | float):
        return num(DASH)
    text = f"{diff['mean']:+.3f}"
    ci = diff.get("ci")
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(isinstance(v, int | float) for v in ci):
        text += f" [{ci[0]:+.3f}, {ci[1]:+.3f}]"
    text += f" ({diff.get('wins', 0)}/{diff.get('losses', 0)}"
    ties = diff.get("ties", 0)
    return num(text + (f", {ties} tied)" if ties else ")"))


def section_paired(run: RunData) -> dict | None:
    """``metrics.json``'s ``paired`` (``{"baseline", "table": {condition: {metric: paired_difference}}}``):
    each condition minus the baseline, paired by seed."""
    paired = (run.metrics or {}).get("paired")
    table = paired.get("table") if isinstance(paired, dict) else None
    if not isinstance(table, dict) or not table:
        return None
    table = {c: pm for c, pm in table.items() if isinstance(pm, dict)}
    diffs = {c: [d for d in pm.values() if isinstance(d, dict)] for c, pm in table.items()}
    metrics = list(dict.fromkeys(m for pm in table.values() for m in pm))
    seeds = {c: max((d.get("n", 0) for d in ds), default=0) for c, ds in diffs.items()}
    body = [
        [run.condition_label(c).removeprefix("+ "), *[paired_cell(pm.get(m)) for m in metrics], seeds[c]]
        for c, pm in table.items()
    ]
    return {
        "baseline": run.condition_label(str(paired.get("baseline", "unguided"))).removeprefix("+ "),
        "level": _level_text([d for ds in diffs.values() for d in ds]),
        "table": Table(["condition", *[GROUP_LABELS.get(m, m) for m in metrics], "seeds"], body),
    }


def _level_text(diffs: list[dict]) -> str:
    """The confidence level the ``paired_difference`` results share (``95%``), else ``confidence``."""
    levels = {d.get("level") for d in diffs}
    level = next(iter(levels)) if len(levels) == 1 else None
    finite = isinstance(level, int | float) and math.isfinite(level)
    return f"{100 * level:g}%" if finite else "confidence"


def split_headers(names: list[str]) -> list[str]:
    """Headers of extra splits: ``nuisance:rotate`` -> ``rotate`` (full names when that is ambiguous)."""
    short = [n.split(":", 1)[-1] for n in names]
    return short if len(set(short)) == len(short) else list(names)


def _clean_top1(metrics: dict, cond: str) -> object:
    """The ``mean_std`` of top-1 on the clean evaluation set: ``base`` or ``conditions[cond]``."""
    row = metrics.get("base") if cond == "base" else (metrics.get("conditions") or {}).get(cond)
    return row.get("top1") if isinstance(row, dict) else None


def section_nuisance(run: RunData) -> dict | None:
    """``metrics.json``'s ``splits`` (``{split: {condition: mean_std of top-1}}``): accuracy on each nuisance
    test split per condition (base too when present), next to the clean test set's."""
    metrics = run.metrics or {}
    raw = metrics.get("splits")
    raw = raw if isinstance(raw, dict) else {}
    splits = {n: per for n, per in raw.items() if isinstance(per, dict) and per}
    if not splits:
        return None
    conds = list(dict.fromkeys(c for per in splits.values() for c in per))
    conds = sorted(conds, key=lambda c: c != "base")  # stable: base first, then the run's order
    body = [
        [base_label(run) if c == "base" else run.condition_label(c), fmt_stat(_clean_top1(metrics, c)),
         *[fmt_stat(per.get(c)) for per in splits.values()]]
        for c in conds
    ]
    counts = [s.get("n") for per in splits.values() for s in per.values() if isinstance(s, dict)]
    return {
        "n_seeds": max((n for n in counts if isinstance(n, int)), default=0),
        "evaluated_on": metrics.get("evaluated_on"),
        "table": Table(["condition", "clean", *split_headers(list(splits))], body, "compact"),
    }


def section_efficiency(run: RunData) -> dict | None:
    """``efficiency.json`` (or metrics.json's ``efficiency``): Few accuracy after one round of n synthetic images
    per class, per condition and n, and the paired Few difference to ``unguided`` per n."""
    eff = run.efficiency
    table = eff.get("table") if isinstance(eff, dict) else None
    if not isinstance(table, dict) or not table:
        return None
    table = {c: row for c, row in table.items() if isinstance(row, dict)}
    sizes = sorted({int(n) for n in eff.get("sizes") or [n for row in table.values() for n in row]})
    headers = ["condition", *[f"n = {n}" for n in sizes]]
    labels = {c: run.condition_label(c).removeprefix("+ ") for c in table}
    body = [[labels[c], *[fmt_stat((row.get(str(n)) or {}).get("few")) for n in sizes]] for c, row in table.items()]
    paired = eff.get("paired") if isinstance(eff.get("paired"), dict) else {}
    diffs = {
        c: [((paired.get(str(n)) or {}).get(c) or {}).get("few") for n in sizes] for c in table if c != "unguided"
    }
    rows = [[labels[c], *map(paired_cell, ds)] for c, ds in diffs.items()]
    seeds, epochs = eff.get("seeds"), eff.get("epochs")
    return {
        "epochs": epochs if isinstance(epochs, int) else None,
        "n_seeds": len(seeds) if isinstance(seeds, list) else None,
        "plot": image(plot_efficiency({**eff, "table": table}, labels), "data efficiency"),
        "table": Table(headers, body),
        "baseline": run.condition_label("unguided").removeprefix("+ "),
        "level": _level_text([d for ds in diffs.values() for d in ds if isinstance(d, dict)]),
        "paired": Table(headers, rows) if paired and rows else None,
    }


def section_rounds(run: RunData) -> dict | None:
    """Accuracy per mining round, one line per condition (mean over seeds, band = ± std)."""
    histories = {c: (run.condition_label(c), run.histories(c)) for c in run.conditions}
    histories = {
        c: h for c, h in histories.items() if any(k in r for x in h[1] for r in x for k in GROUP_KEYS)
    }
    return {"plot": image(plot_rounds(histories), "rounds")} if histories else None


def section_detection(run: RunData) -> dict | None:
    """How well each signal flags rare and hard test images (Figure 5) and the q90 split (Figure 11)."""
    dets = {s: run.base[s]["detection"] for s in sorted(run.base) if run.base[s].get("detection")}
    if not dets:
        return None
    keys = ("auroc_rare", "auroc_hard", "acc_above_q90", "acc_below_q90")
    body = [
        [sig, *[fmt_ms([d[sig].get(k) for d in dets.values() if sig in d]) for k in keys]]
        for sig in next(iter(dets.values()))
    ]
    seed, scores = next(((s, x) for s in run.seeds if (x := run.scores(s)) is not None), (None, None))
    headers = ["signal", "AUROC rare", "AUROC hard", "accuracy above q90", "accuracy below q90"]
    return {
        "n_seeds": len(dets),
        "table": Table(headers, body),
        "roc": image(plot_roc(scores)[0], "ROC curves") if scores is not None else None,
        "roc_seed": seed,
    }
