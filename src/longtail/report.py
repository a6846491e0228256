"""One self-contained HTML page for a run directory (``longtail report RUN_DIR``).

Everything is inlined: plots are drawn with matplotlib (no pyplot, Agg via ``Figure.savefig``) and every
image is a base64 ``data:image/png`` URI, so the file opens anywhere, offline, without scripts.

The page is a list of sections (``SECTIONS``). A section is a builder ``(RunData) -> str | None`` that returns
an HTML fragment; it raises ``Missing`` when the stage that produces its data has not run (the page then
says what is missing), and an *optional* section returns ``None`` to vanish when its file is absent. To add
one, write a builder and append ``Section(id, title, builder)`` to ``SECTIONS`` (or pass ``sections=``).

Run-directory layout read here (what ``longtail.demo`` writes): ``config.yaml``, ``summary.txt``,
``metrics.json``, ``sweep/{sweep.json, grid_<signal>.png}``, ``seed_<s>/base/{metrics.json,
test_scores.safetensors}``, ``seed_<s>/mining/<condition>/round_<r>/metrics.json``,
``seed_<s>/mining/<condition>/synthetic/manifest.csv`` (+ PNGs); optional ``distribution.json``,
``trajectory.json``, ``introspection/*.json``.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from torch import Tensor

from .conditions import condition_label
from .evaluation.metrics import dense_rank

GROUP_KEYS = ("top1", "many", "medium", "few")
GROUP_LABELS = {"top1": "top-1", "many": "Many", "medium": "Medium", "few": "Few"}
CONDITION_ORDER = ("none", "unguided", "ltg")
CONDITION_COLORS = {"base": "tab:gray", "none": "tab:blue", "unguided": "tab:orange", "ltg": "tab:red"}
OTHER_COLORS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def condition_color(cond: str, index: int = 0) -> str:
    """The same colour for a condition in every plot; others cycle through a fixed list."""
    return CONDITION_COLORS.get(cond, OTHER_COLORS[index % len(OTHER_COLORS)])


class Missing(Exception):
    """Raised by a section builder when the data it needs is not in the run directory."""


# --- loading the run ----------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _read_text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def _seed_dirs(root: Path) -> dict[int, Path]:
    out = {}
    for d in root.glob("seed_*"):
        m = re.fullmatch(r"seed_(\d+)", d.name)
        if d.is_dir() and m:
            out[int(m.group(1))] = d
    return dict(sorted(out.items()))


def _round_histories(seed_dir: Path) -> dict[str, list[dict]]:
    """``mining/<condition>/round_<r>/metrics.json`` -> condition -> rounds in order."""
    out: dict[str, list[dict]] = {}
    for cond_dir in sorted((seed_dir / "mining").glob("*")):
        rounds = []
        for rd in cond_dir.glob("round_*"):
            m = re.fullmatch(r"round_(\d+)", rd.name)
            row = _read_json(rd / "metrics.json") if m else None
            if row is not None:
                rounds.append({"round": int(m.group(1)), **row})
        if rounds:
            out[cond_dir.name] = sorted(rounds, key=lambda r: r["round"])
    return out


@dataclass
class RunData:
    """What a run directory holds, loaded once; missing pieces are ``None`` / empty."""

    root: Path
    config_text: str | None = None
    config: dict | None = None
    summary_text: str | None = None
    metrics: dict | None = None
    sweep: dict | None = None
    base: dict[int, dict] = field(default_factory=dict)  # seed -> base metrics
    mining: dict[int, dict[str, list[dict]]] = field(default_factory=dict)  # seed -> condition -> rounds
    class_names: list[str] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return sorted(set(self.base) | set(self.mining))

    @property
    def conditions(self) -> list[str]:
        found = {c for per_seed in self.mining.values() for c in per_seed}
        configured = list(((self.config or {}).get("mining") or {}).get("conditions") or [])
        order = [*configured, *CONDITION_ORDER]
        return sorted(found, key=lambda c: (order.index(c) if c in order else len(order), c))

    def ltg_label(self) -> str:
        ltg = (self.metrics or {}).get("ltg") or {}
        mining = (self.config or {}).get("mining") or {}
        signal, weight = ltg.get("signal", mining.get("signal")), ltg.get("weight", mining.get("weight"))
        if signal is None:
            return "LTG"
        return f"LTG ({signal}, w={weight:g})" if isinstance(weight, int | float) else f"LTG ({signal})"

    def condition_label(self, cond: str) -> str:
        guided = ((self.metrics or {}).get("condition_guidance") or {}).get(cond)
        if cond == "ltg" and guided is None:
            return f"+ {self.ltg_label()} synthetic"
        return condition_label(cond, guided)

    def scores(self, seed: int) -> dict[str, Tensor] | None:
        """``seed_<s>/base/test_scores.safetensors``: ``signal/<name>``, ``labels``, ``preds``, ``rare``."""
        path = self.root / f"seed_{seed}" / "base" / "test_scores.safetensors"
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        return load_file(str(path))

    def class_name(self, c: int) -> str:
        return self.class_names[c] if c < len(self.class_names) else f"class {c}"


def _class_names(root: Path, metrics: dict | None, base: dict[int, dict]) -> list[str]:
    """From ``metrics.json['class_names']``, else the synthetic manifests, else ``class <i>``."""
    if metrics and metrics.get("class_names"):
        return list(metrics["class_names"])
    names: dict[int, str] = {}
    for manifest in sorted(root.glob("seed_*/mining/*/synthetic/manifest.csv")):
        for row in _manifest_rows(manifest.parent):
            names.setdefault(int(row["class_id"]), row["class_name"])
    num = max([len(b.get("per_class", [])) for b in base.values()] + [max(names, default=-1) + 1])
    return [names.get(c, f"class {c}") for c in range(num)]


def _manifest_rows(store_dir: Path) -> list[dict[str, str]]:
    from .data.store import SyntheticStore

    return SyntheticStore(store_dir).rows()


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory; raises ``FileNotFoundError`` naming the path if it is absent or not a run."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory {root} does not exist (or is not a directory)")
    known = ("config.yaml", "metrics.json", "summary.txt", "sweep")
    if not any((root / k).exists() for k in known) and not _seed_dirs(root):
        raise FileNotFoundError(
            f"{root} is not a run directory: none of {', '.join(known)} or seed_*/ is there"
        )
    run = RunData(
        root=root,
        config_text=_read_text(root / "config.yaml"),
        summary_text=_read_text(root / "summary.txt"),
        metrics=_read_json(root / "metrics.json"),
    )
    if run.config_text is not None:
        import yaml

        loaded = yaml.safe_load(run.config_text)
        run.config = loaded if isinstance(loaded, dict) else None
    metrics = run.metrics or {}
    run.sweep = _read_json(root / "sweep" / "sweep.json") or metrics.get("sweep")
    per_seed = {int(s): v for s, v in (metrics.get("per_seed") or {}).items()}
    for seed in sorted(set(_seed_dirs(root)) | set(per_seed)):
        base = _read_json(root / f"seed_{seed}" / "base" / "metrics.json") or per_seed.get(seed, {}).get(
            "base"
        )
        if base is not None:
            run.base[seed] = base
        mining = {**per_seed.get(seed, {}).get("mining", {}), **_round_histories(root / f"seed_{seed}")}
        if mining:
            run.mining[seed] = mining
    run.class_names = _class_names(root, run.metrics, run.base)
    return run


# --- HTML and figure helpers --------------------------------------------------------------------------------


def esc(text: object) -> str:
    return html.escape(str(text))


def fmt(value: object, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` decimals (1 from 100 up), NaN / None as a dash, bools yes / no."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.{digits}f}"
    return esc(value)


class _Num(str):
    """A pre-formatted number: inserted as given, right-aligned like the numbers ``fmt`` formats."""


def _num(text: str) -> _Num:
    return _Num(esc(text))


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample std (0 for one value) and count of the finite ``values``; NaN mean when none."""
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def fmt_ms(values: Sequence[float]) -> _Num:
    """``mean ± std`` over seeds (just the mean for one seed), as a right-aligned cell."""
    m, s, n = mean_std(values)
    return _Num(f"{fmt(m)} ± {fmt(s)}" if n > 1 else fmt(m))


def _cell(value: object) -> str:
    if isinstance(value, str) and not isinstance(value, _Num):
        return f"<td>{value}</td>"
    return f'<td class="num">{value if isinstance(value, _Num) else fmt(value)}</td>'


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], cls: str = "") -> str:
    """An HTML table; cells are formatted with ``fmt`` unless already a ``str`` (inserted as given)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    cls = f' class="{cls}"' if cls else ""
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f'<div class="tw"><table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _numf(value: object, spec: str = ".1f") -> _Num | None:
    """A finite number formatted with ``spec``; anything else shows as a dash."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return _num(format(value, spec)) if ok else None


def png_data_uri(png: bytes) -> str:
    if not png.startswith(PNG_MAGIC):
        raise ValueError("not a PNG image")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str, width: int | None = None, cls: str = "") -> str:
    extra = (f' width="{width}"' if width else "") + (f' class="{cls}"' if cls else "")
    return f'<img src="{png_data_uri(png)}" alt="{esc(alt)}"{extra}>'


def shrink_png(png: bytes, max_side: int = 1600) -> bytes:
    """The PNG itself, or a downscaled copy when its longer side exceeds ``max_side`` (keeps pages light)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    if max(image.size) <= max_side:
        return png
    image.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def note(text: str, kind: str = "info") -> str:
    return f'<p class="note {kind}">{text}</p>'


def pre_json(data: object, limit: int = 20_000) -> str:
    text = json.dumps(data, indent=2, default=str)
    if len(text) > limit:
        text = text[:limit] + "\n… (truncated)"
    return f"<pre>{esc(text)}</pre>"


def _final_rounds(run: RunData, cond: str) -> list[dict]:
    return [run.mining[s][cond][-1] for s in run.seeds if cond in run.mining.get(s, {})]


# --- sections -----------------------------------------------------------------------------------------------


def section_overview(run: RunData) -> str:
    """The printed summary table next to the resolved config."""
    parts = []
    summary = (
        f"<pre>{esc(run.summary_text.rstrip())}</pre>"
        if run.summary_text
        else note("Missing <code>summary.txt</code>: the run has not reached its summary stage.", "missing")
    )
    config = (
        f'<pre class="scroll">{esc(run.config_text.rstrip())}</pre>'
        if run.config_text
        else note("Missing <code>config.yaml</code>.", "missing")
    )
    parts.append(f"<h3>Summary</h3>{summary}")
    parts.append(
        f'<div class="cols"><div>{_stage_status(run)}</div><div><h3>config.yaml</h3>{config}</div></div>'
    )
    return "".join(parts)


def _stage_status(run: RunData) -> str:
    rows = []
    sweep_points = len((run.sweep or {}).get("points", []))
    rows.append(("base classifiers", f"seeds {sorted(run.base)}" if run.base else "missing"))
    rows.append(("guidance sweep", f"{sweep_points} points" if run.sweep else "missing"))
    for cond in run.conditions:
        done = {s: len(run.mining[s][cond]) - 1 for s in run.seeds if cond in run.mining.get(s, {})}
        rows.append((f"mining: {cond}", ", ".join(f"seed {s}: {r} rounds" for s, r in done.items())))
    if not run.conditions:
        rows.append(("mining", "missing"))
    rows.append(("summary (metrics.json)", "present" if run.metrics else "missing"))
    for name in ("distribution.json", "trajectory.json", "introspection"):
        rows.append((name, "present" if (run.root / name).exists() else "not produced (optional)"))
    cells = [(esc(a), f'<span class="{"bad" if b == "missing" else "ok"}">{esc(b)}</span>') for a, b in rows]
    return "<h3>Stages</h3>" + table(["stage", "status"], cells, "narrow")


def _accuracy_rows(run: RunData) -> list[tuple[str, str, list[dict]]]:
    """``(key, label, final metrics per seed)`` for the base classifier and each condition."""
    rows = (
        [("base", "base (long-tailed real data only)", [run.base[s] for s in sorted(run.base)])]
        if run.base
        else []
    )
    rows += [(c, run.condition_label(c), _final_rounds(run, c)) for c in run.conditions]
    return rows


def plot_accuracy_bars(rows: list[tuple[str, str, list[dict]]]) -> bytes:
    """Grouped bars: top-1 / Many / Medium / Few per condition; error bars = std over seeds."""
    fig = Figure(figsize=(9, 3.6))
    ax = fig.subplots()
    width = 0.8 / len(rows)
    x = np.arange(len(GROUP_KEYS))
    for i, (key, label, finals) in enumerate(rows):
        stats = [mean_std([f.get(k, math.nan) for f in finals]) for k in GROUP_KEYS]
        means = [m for m, _, _ in stats]
        errs = [s if n > 1 else 0.0 for _, s, n in stats]
        ax.bar(
            x + (i - (len(rows) - 1) / 2) * width,
            means,
            width,
            yerr=errs,
            capsize=3,
            label=label,
            color=condition_color(key, i),
        )
    ax.set_xticks(x, [GROUP_LABELS[k] for k in GROUP_KEYS])
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure_png(fig)


def section_accuracy(run: RunData) -> str:
    """Final accuracy per condition, by Many / Medium / Few (paper section 6, Table 3's columns)."""
    rows = _accuracy_rows(run)
    if not rows:
        raise Missing(
            "no classifier metrics yet: <code>seed_*/base/metrics.json</code> and "
            "<code>seed_*/mining/*/round_*/metrics.json</code> are absent (base and mining stages)."
        )
    n_seeds = max(len(f) for _, _, f in rows)
    parts = [
        f"<p>Test accuracy after the last mining round, mean over {n_seeds} seed(s)"
        f"{' ± std' if n_seeds > 1 else ''}. Every condition fine-tunes the same base classifier with the"
        " same schedule; only the synthetic data differs.</p>",
        img(plot_accuracy_bars(rows), "accuracy by group"),
    ]
    body = []
    for _, label, finals in rows:
        rounds = sorted({f.get("round", 0) for f in finals})
        body.append(
            [
                esc(label),
                *[fmt_ms([f.get(k, math.nan) for f in finals]) for k in GROUP_KEYS],
                len(finals),
                "–" if not rounds or rounds == [0] else esc("/".join(map(str, rounds))),
            ]
        )
    parts.append(table(["condition", *[GROUP_LABELS[k] for k in GROUP_KEYS], "seeds", "rounds"], body))
    parts.append(_per_class_table(run, rows))
    return "".join(parts)


def _per_class_table(run: RunData, rows: list[tuple[str, str, list[dict]]]) -> str:
    num = max((len(f.get("per_class", [])) for _, _, finals in rows for f in finals), default=0)
    if num == 0:
        return ""
    groups = (run.metrics or {}).get("groups")
    headers = ["class", *(["group"] if groups else []), *[label for _, label, _ in rows]]
    body = []
    for c in range(num):
        cells = [
            fmt_ms([f["per_class"][c] for f in finals if len(f.get("per_class", [])) > c])
            for _, _, finals in rows
        ]
        body.append([esc(run.class_name(c)), *([esc(groups[c])] if groups else []), *cells])
    return f"<details><summary>Per-class accuracy ({num} classes)</summary>{table(headers, body)}</details>"


def plot_rounds(run: RunData) -> bytes:
    """Accuracy per mining round (Figure 3's loop): one panel per group, one line per condition."""
    fig = Figure(figsize=(12, 3.2))
    axes = fig.subplots(1, len(GROUP_KEYS), sharex=True)
    for i, cond in enumerate(run.conditions):
        histories = [run.mining[s][cond] for s in run.seeds if cond in run.mining.get(s, {})]
        rounds = sorted({h["round"] for hist in histories for h in hist})
        for ax, key in zip(axes, GROUP_KEYS, strict=True):
            stats = [
                mean_std([h.get(key, math.nan) for hist in histories for h in hist if h["round"] == r])
                for r in rounds
            ]
            m = np.array([s[0] for s in stats])
            sd = np.array([s[1] for s in stats])
            color = condition_color(cond, i)
            ax.plot(rounds, m, marker="o", label=run.condition_label(cond), color=color)
            if len(histories) > 1:
                ax.fill_between(rounds, m - sd, m + sd, color=color, alpha=0.15)
    for ax, key in zip(axes, GROUP_KEYS, strict=True):
        ax.set_title(GROUP_LABELS[key])
        ax.set_xlabel("mining round")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_ylabel("test accuracy")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    return figure_png(fig)


def section_rounds(run: RunData) -> str:
    if not run.conditions:
        raise Missing(
            "no mining rounds yet: <code>seed_*/mining/&lt;condition&gt;/round_*/metrics.json</code> "
            "are absent (mining stage)."
        )
    return (
        "<p>Round 0 is the base classifier; each later round generates with the classifier as it is then, "
        "adds the images, and fine-tunes (mean over seeds, band = ± std).</p>"
        + img(plot_rounds(run), "rounds")
    )



def plot_roc(scores: dict[str, Tensor]) -> tuple[bytes, dict[str, dict[str, float]]]:
    """ROC curves of every signal for rare (Few-class) and hard (misclassified) test images (Figure 5)."""
    from torchmetrics.functional.classification import binary_roc

    from .evaluation.metrics import auroc

    targets = {"rare": scores["rare"].bool(), "hard": scores["preds"] != scores["labels"]}
    signals = sorted(k.split("/", 1)[1] for k in scores if k.startswith("signal/"))
    fig = Figure(figsize=(10, 4.2))
    axes = fig.subplots(1, 2)
    aurocs: dict[str, dict[str, float]] = {}
    for ax, (name, target) in zip(axes, targets.items(), strict=True):
        both = bool(target.any() and (~target).any())
        for sig in signals:
            score = dense_rank(scores[f"signal/{sig}"])
            aurocs.setdefault(sig, {})[name] = auroc(score, target)
            if both:
                fpr, tpr, _ = binary_roc(score, target.long())
                ax.plot(fpr.numpy(), tpr.numpy(), label=f"{sig} (AUROC {aurocs[sig][name]:.3f})")
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        ax.set_title(f"{name} test images ({int(target.sum())} of {target.numel()})")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_aspect("equal")
        if both:
            ax.legend(fontsize=8, loc="lower right")
        else:
            ax.text(0.5, 0.5, f"no {'positive' if not target.any() else 'negative'} examples", ha="center")
    return figure_png(fig), aurocs


def section_detection(run: RunData) -> str:
    """How well each signal flags rare and hard test images (Figure 5) and the q90 split (Figure 11)."""
    dets = {s: run.base[s]["detection"] for s in sorted(run.base) if "detection" in run.base[s]}
    if not dets:
        raise Missing(
            "no detection metrics: <code>seed_*/base/metrics.json</code> is absent or has no "
            "<code>detection</code> (base stage)."
        )
    signals = list(next(iter(dets.values())))
    body = []
    for sig in signals:
        vals = {
            k: [d[sig][k] for d in dets.values() if sig in d]
            for k in ("auroc_rare", "auroc_hard", "acc_above_q90", "acc_below_q90")
        }
        body.append([esc(sig), *[fmt_ms(v) for v in vals.values()]])
    parts = [
        f"<p>Base classifier, test set, {len(dets)} seed(s). Rare = the image's class is a Few class; hard = "
        "the classifier gets it wrong. The last two columns split the test set at each signal's 90% quantile "
        "(Figure 11): a useful longtail signal has much lower accuracy above it.</p>",
        table(["signal", "AUROC rare", "AUROC hard", "accuracy above q90", "accuracy below q90"], body),
    ]
    seed = next((s for s in run.seeds if run.scores(s) is not None), None)
    if seed is None:
        parts.append(
            note("Missing <code>seed_*/base/test_scores.safetensors</code>: no ROC curves.", "missing")
        )
    else:
        png, _ = plot_roc(run.scores(seed))
        parts.append(f"<h3>ROC curves (seed {seed})</h3>" + img(png, "ROC curves"))
    return "".join(parts)


def _sweep_by_signal(points: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in points:
        out.setdefault(p["signal"], []).append(p)
    return {s: sorted(v, key=lambda p: p["weight"]) for s, v in out.items()}


def plot_sweep(sweep: dict) -> bytes:
    """Figure 2: mean signal and mean P(class) of generated images against the guidance weight, per signal."""
    by_signal = _sweep_by_signal(sweep["points"])
    choices = sweep.get("choices", {})
    positive = [p["weight"] for p in sweep["points"] if p["weight"] > 0]
    fig = Figure(figsize=(10, 2.8 * len(by_signal)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(by_signal), 2, squeeze=False))
    for row, (sig, pts) in zip(axes, by_signal.items(), strict=True):
        w = [p["weight"] for p in pts]
        row[0].plot(w, [p["mean_signal"] for p in pts], marker="o", color="tab:red")
        row[0].set_ylabel(f"mean {sig}")
        row[1].plot(w, [p["mean_p_class"] for p in pts], marker="o", label="P(intended class)")
        row[1].plot(w, [p["accuracy"] for p in pts], marker="s", ls="--", label="accuracy")
        row[1].set_ylim(-0.02, 1.02)
        chosen = (choices.get(sig) or {}).get("weight")
        for ax in row:
            ax.axhline(ax.lines[0].get_ydata()[0], ls=":", color="grey", lw=1)  # the unguided level
            if chosen is not None:
                ax.axvline(chosen, ls="--", color="green", lw=1)
            if positive:
                ax.set_xscale("symlog", linthresh=min(positive))
            ax.set_xticks(w, [f"{x:g}" for x in w])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("guidance weight w")
            ax.grid(alpha=0.3)
        row[0].ticklabel_format(axis="y", useOffset=False)
        row[1].legend(fontsize=8)
    axes[0][0].set_title("longtail signal (higher = more longtail)")
    axes[0][1].set_title("in distribution?")
    return figure_png(fig)


def section_sweep(run: RunData) -> str:
    """Signal and P(class) against the guidance weight (Figure 2), weight choices, generation speed."""
    if not run.sweep or not run.sweep.get("points"):
        raise Missing("Missing <code>sweep/sweep.json</code>: the guidance sweep has not run (sweep stage).")
    sw = run.sweep
    parts = [
        "<p>Generated images scored by the base classifier (first seed). The paper's rule (section 3.1): "
        "pick a weight whose P(class) is below the unguided one but clearly above zero while the signal "
        "rises. Dotted: unguided level; dashed green: the chosen weight.</p>",
        img(plot_sweep(sw), "sweep"),
    ]
    body = [
        [
            esc(p["signal"]),
            _num(f"{p['weight']:g}"),
            p["mean_signal"],
            p["mean_p_class"],
            p["accuracy"],
            p.get("n"),
            _numf(p["n"] / p["seconds"] if p.get("seconds") else None),
            p.get("nonfinite"),
        ]
        for p in sw["points"]
    ]
    parts.append(
        "<h3>Sweep points</h3>"
        + table(
            ["signal", "weight", "mean signal", "P(class)", "accuracy", "images", "img/s", "non-finite"], body
        )
    )
    if sw.get("choices"):
        rows = [
            [
                esc(s),
                _num(f"{c['weight']:g}") if c.get("weight") is not None else "none passed",
                c.get("baseline_signal"),
                c.get("baseline_p_class"),
                esc(c.get("reason", "")),
            ]
            for s, c in sw["choices"].items()
        ]
        parts.append(
            "<h3>Weight choices</h3>"
            + table(["signal", "chosen weight", "unguided signal", "unguided P(class)", "reason"], rows)
        )
    if sw.get("timing"):
        t = sw["timing"]
        parts.append(
            "<h3>Generation speed</h3>"
            + table(
                ["unguided img/s", "guided img/s", "slowdown (x)"],
                [[_numf(t.get(k)) for k in ("unguided_img_per_s", "guided_img_per_s", "slowdown")]],
            )
            + "<p>Guided sampling backpropagates through the decoder and classifier every step; the paper "
            "reports 6.3x slower for Stable Diffusion at 512 px (A.5).</p>"
        )
    return "".join(parts)


def grid_geometry(width: int, height: int, rows: int, columns: int) -> tuple[int, int] | None:
    """``(cell, tiles per row)`` of a sweep grid (``longtail.demo.save_grid``: padding 2, square images,
    one row per class, each tile ``columns`` images wide), or ``None`` if the size does not fit it."""
    if rows <= 0 or columns <= 0 or (height - 2) % rows:
        return None
    cell = (height - 2) // rows - 2
    tile = columns * cell + 2
    if cell <= 0 or (width - 2) % tile:
        return None
    return cell, (width - 2) // tile


def plot_grid(png: bytes, class_names: Sequence[str], weights: Sequence[float], height: int = 760) -> bytes:
    """Redraw a sweep grid about ``height`` px tall (integer zoom) with class names on the rows and the weight
    above each image column; the PNG unchanged if its size does not match the demo's layout."""
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    h, w = image.shape[:2]
    scale = max(1, min(4, height // h)) if h <= height else height / h  # pixel-exact zoom, or shrink
    geometry = grid_geometry(w, h, len(class_names), len(weights))
    if geometry is None:
        return shrink_png(png, 2 * height)
    cell, tiles = geometry
    fig = Figure(figsize=(w * scale / 100, h * scale / 100))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(image, interpolation="nearest" if scale >= 1 else "antialiased")
    ax.set_yticks(
        [2 + r * (cell + 2) + cell / 2 for r in range(len(class_names))], list(class_names), fontsize=9
    )
    xs = [
        2 + t * (len(weights) * cell + 2) + j * cell + cell / 2
        for t in range(tiles)
        for j in range(len(weights))
    ]
    ax.set_xticks(xs, [("0" if wt == 0 else f"{wt:g}") for _ in range(tiles) for wt in weights], fontsize=8)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return figure_png(fig)


def section_grids(run: RunData) -> str:
    """The sweep's image grids: the paper's Figure 6 analog."""
    grids = sorted((run.root / "sweep").glob("grid_*.png"))
    if not grids:
        raise Missing("Missing <code>sweep/grid_*.png</code>: the guidance sweep has not run (sweep stage).")
    weights = (run.sweep or {}).get("grid_weights") or []
    cols = (
        ", ".join("unguided" if w == 0 else f"w = {w:g}" for w in weights)
        or "unguided, then increasing weights"
    )
    parts = [
        f"<p>One row per class; within a row, each tile is one seed shown unguided and then at increasing "
        f"guidance weights ({esc(cols)}), so columns of a tile differ only by the guidance. Generated with "
        "the base classifier of the first seed.</p>",
        '<div class="grids">',
    ]
    for path in grids:
        signal = path.stem.removeprefix("grid_")
        png = path.read_bytes()
        drawn = plot_grid(png, run.class_names, weights) if weights else shrink_png(png)
        parts.append(
            f"<figure>{img(drawn, f'grid {signal}', cls='pixel')}<figcaption>guided by <b>{esc(signal)}"
            "</b></figcaption></figure>"
        )
    parts.append("</div>")
    return "".join(parts)


MONTAGE_CLASSES = 20  # rows of the synthetic-image montage (large label sets show their first classes)
THUMB = 64  # longest side of a montage thumbnail, px


def _montage(
    store_dir: Path, rows: list[dict[str, str]], num_classes: int, per_class: int = 6
) -> np.ndarray | None:
    """RGB montage ``[H, W, 3]``: a row per class (up to ``MONTAGE_CLASSES``), up to ``per_class`` thumbnails
    of the last round's images each, padding 2."""
    from PIL import Image

    num_classes = min(num_classes, MONTAGE_CLASSES)
    last_rows = [r for r in rows if int(r.get("round") or 0) == max(int(r.get("round") or 0) for r in rows)]
    per_class = min(per_class, max(Counter(r["class_id"] for r in last_rows).values()))
    tiles: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    for r in last_rows:
        c = int(r["class_id"])
        if c < num_classes and len(tiles[c]) < per_class:
            im = Image.open(store_dir / r["path"]).convert("RGB")
            im.thumbnail((THUMB, THUMB))
            tiles[c].append(np.asarray(im))
    first = next((t[0] for t in tiles if t), None)
    if first is None:
        return None
    h, w = first.shape[:2]
    canvas = np.full((2 + num_classes * (h + 2), 2 + per_class * (w + 2), 3), 128, dtype=np.uint8)
    for c, imgs in enumerate(tiles):
        for j, im in enumerate(imgs):
            if im.shape[:2] == (h, w):
                canvas[2 + c * (h + 2) : 2 + c * (h + 2) + h, 2 + j * (w + 2) : 2 + j * (w + 2) + w] = im
    return canvas


def plot_montages(montages: dict[str, np.ndarray], class_names: Sequence[str]) -> bytes:
    """Montages side by side, one panel per condition, class names on the rows of the first."""
    first = next(iter(montages.values()))
    rows = min(len(class_names), MONTAGE_CLASSES)
    zoom = 48 / max((first.shape[0] - 2) / rows - 2, 1)  # thumbnails shown about 48 px tall
    width = max(first.shape[1] * zoom / 100, 2.8)  # room for the panel titles
    fig = Figure(
        figsize=(width * len(montages) + 1.2, first.shape[0] * zoom / 100 + 0.6), layout="constrained"
    )
    axes = fig.subplots(1, len(montages), squeeze=False)[0]
    for i, (ax, (label, canvas)) in enumerate(zip(axes, montages.items(), strict=True)):
        ax.imshow(canvas, interpolation="nearest")
        h = (canvas.shape[0] - 2) / rows
        ax.set_yticks(
            [2 + r * h + h / 2 - 1 for r in range(rows)],
            list(class_names[:rows]) if i == 0 else [""] * rows,
            fontsize=8,
        )
        ax.set_xticks([])
        ax.tick_params(length=0)
        ax.set_title(label, fontsize=9)
    return figure_png(fig)


def section_synthetic(run: RunData) -> str:
    """What the mining loop generated: scores recorded at generation time, and the last round's images."""
    stores = {
        (s, c): run.root / f"seed_{s}" / "mining" / c / "synthetic" for s in run.seeds for c in run.conditions
    }
    found = {k: _manifest_rows(d) for k, d in stores.items() if (d / "manifest.csv").is_file()}
    found = {k: v for k, v in found.items() if v}
    if not found:
        raise Missing(
            "no synthetic data yet: <code>seed_*/mining/*/synthetic/manifest.csv</code> is absent "
            "(mining stage, conditions with synthetic data)."
        )
    body = []
    for (seed, cond), rows in found.items():
        for rnd in sorted({int(r.get("round") or 0) for r in rows}):
            sel = [r for r in rows if int(r.get("round") or 0) == rnd]
            sig = [float(r["signal"]) for r in sel if r.get("signal") not in (None, "")]
            pc = [float(r["p_class"]) for r in sel if r.get("p_class") not in (None, "")]
            agree = [r["pred"] == r["class_id"] for r in sel if r.get("pred") not in (None, "")]
            body.append(
                [
                    seed,
                    esc(cond),
                    rnd,
                    len(sel),
                    esc(sel[0].get("signal_name") or "–"),
                    esc(sel[0].get("weight") or "–"),
                    mean_std(sig)[0],
                    mean_std(pc)[0],
                    sum(agree) / len(agree) if agree else None,
                ]
            )
    parts = [
        "<p>Scores recorded when each image was generated, by the classifier of that round: LTG data should "
        "score a higher signal and a lower (but not vanishing) P(class) than unguided data.</p>",
        table(
            [
                "seed",
                "condition",
                "round",
                "images",
                "signal",
                "weight",
                "mean signal",
                "mean P(class)",
                "classified as intended",
            ],
            body,
        ),
    ]
    seed = min(s for s, _ in found)
    montages = {}
    for (s, cond), rows in found.items():
        if s == seed:
            canvas = _montage(stores[(s, cond)], rows, len(run.class_names))
            if canvas is not None:
                montages[run.condition_label(cond)] = canvas
    if montages:
        parts.append(
            f"<h3>Last round's images (seed {seed})</h3>"
            + (
                f"<p>First {MONTAGE_CLASSES} of {len(run.class_names)} classes.</p>"
                if len(run.class_names) > MONTAGE_CLASSES
                else ""
            )
            + img(plot_montages(montages, run.class_names), "synthetic samples", cls="pixel")
        )
    return "".join(parts)


def _distribution_reports(data: dict) -> dict[str, list[dict]]:
    """``distribution.json`` -> label -> reports (one per seed).

    Accepts the demo's ``{"conditions": {condition: {seed: report}}}``, a single ``distribution_report`` or a
    mapping ``name -> report``.
    """
    if "per_class" in data:
        return {"synthetic": [data]}
    if isinstance(data.get("conditions"), dict):
        return {
            c: [r for r in per_seed.values() if isinstance(r, dict) and "per_class" in r]
            for c, per_seed in data["conditions"].items()
            if isinstance(per_seed, dict)
        }
    return {k: [v] for k, v in data.items() if isinstance(v, dict) and "per_class" in v}


def plot_distribution(reports: dict[str, list[dict]], labels: dict[str, str]) -> bytes:
    """Per class: within-class synthetic-vs-real FID (mean over seeds) against real-vs-real between classes.

    Up to 30 classes: grouped bars; more: one point per class, below the diagonal = the paper's claim holds.
    """
    first = next(iter(reports.values()))[0]
    names = list(first["per_class"])
    between = [first["per_class"][n]["between_real"]["fid_mean"] for n in names]
    within = {
        k: [mean_std([r["per_class"][n]["fid"] for r in reps])[0] for n in names]
        for k, reps in reports.items()
    }
    colors = {k: condition_color(k, i) for i, k in enumerate(reports)}
    if len(names) > 30:
        fig = Figure(figsize=(5.5, 4.5), layout="constrained")
        ax = fig.subplots()
        for k, vals in within.items():
            ax.scatter(between, vals, s=8, alpha=0.6, color=colors[k], label=labels[k])
        top = np.nanmax([*between, *[v for vals in within.values() for v in vals], 1e-9])
        ax.plot([0, top], [0, top], ls=":", color="grey")
        ax.set_xlabel("real vs real, other classes (mean FID)")
        ax.set_ylabel("synthetic vs real, same class (FID)")
    else:
        fig = Figure(figsize=(max(7, 0.9 * len(names)), 3.4), layout="constrained")
        ax = fig.subplots()
        series = {f"{labels[k]} vs real (same class)": (vals, colors[k]) for k, vals in within.items()}
        series["real vs real (other classes, mean)"] = (between, "tab:gray")
        width = 0.8 / len(series)
        x = np.arange(len(names))
        for i, (label, (vals, color)) in enumerate(series.items()):
            ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=label, color=color)
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("Fréchet distance")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure_png(fig)


_REFERENCE_PAIRS = (("fid", "FID"), ("precision", "precision"), ("recall", "recall"))


def section_distribution(run: RunData) -> str | None:
    """``distribution.json``: FID and precision / recall of synthetic vs real data (sections 3.1, 6)."""
    data = _read_json(run.root / "distribution.json")
    if data is None:
        return None
    reports = {k: v for k, v in (_distribution_reports(data) if isinstance(data, dict) else {}).items() if v}
    if not reports:
        return note("Unrecognised <code>distribution.json</code>; raw content:") + pre_json(data)
    labels = {k: run.condition_label(k).removeprefix("+ ") if k in run.conditions else k for k in reports}
    rows = []
    for k, reps in reports.items():
        overall = [
            fmt_ms([r["overall"].get(m, math.nan) for r in reps]) for m in ("fid", "precision", "recall")
        ]
        refs = [
            _Num(
                f"{fmt_ms([r['reference'].get(f'within_{m}_mean', math.nan) for r in reps])} / "
                f"{fmt_ms([r['reference'].get(f'between_{m}_mean', math.nan) for r in reps])}"
            )
            for m, _ in _REFERENCE_PAIRS
        ]
        below = sum(bool(r["reference"].get("fid_below_between")) for r in reps)
        rows.append(
            [
                esc(labels[k]),
                len(reps),
                reps[0]["overall"].get("n_real"),
                *overall,
                *refs,
                f"{below} of {len(reps)}",
            ]
        )
    features = data.get("features") if isinstance(data, dict) else None
    parts = [
        "<p>The paper's check (section 3.1): synthetic data compared with real data of its own class should "
        "be closer (lower FID, higher precision / recall) than real data of one class compared with another."
        + (f" Features: {esc(features)}." if isinstance(features, str) else "")
        + "</p>",
        table(
            [
                "synthetic set",
                "seeds",
                "real images",
                "FID",
                "precision",
                "recall",
                *[f"{h}: synthetic within class / real between classes" for _, h in _REFERENCE_PAIRS],
                "FID within < between (seeds)",
            ],
            rows,
        ),
        img(plot_distribution(reports, labels), "distribution"),
    ]
    for k, reps in reports.items():
        per_class = [
            [
                esc(c),
                fmt_ms([r["per_class"][c].get("n_fake", math.nan) for r in reps]),
                *[
                    fmt_ms([r["per_class"][c].get(m, math.nan) for r in reps])
                    for m in ("fid", "precision", "recall")
                ],
                *[
                    fmt_ms([r["per_class"][c]["between_real"].get(m, math.nan) for r in reps])
                    for m in ("fid_mean", "fid_min", "precision_mean", "recall_mean")
                ],
            ]
            for c in reps[0]["per_class"]
        ]
        parts.append(
            f"<details><summary>Per class: {esc(labels[k])} ({fmt(reps[0].get('feature_dim'))}-d features, "
            f"k = {fmt(reps[0].get('k'))})</summary>"
            + table(
                [
                    "class",
                    "synthetic",
                    "FID",
                    "precision",
                    "recall",
                    "between FID mean",
                    "between FID min",
                    "between precision",
                    "between recall",
                ],
                per_class,
            )
            + "</details>"
        )
    return "".join(parts)


_TRAJECTORY_LABELS = {
    "fid_predicted_clean": "decoded predicted clean D(P(z_t)): what LTG scores",
    "fid_noisy": "decoded noisy state D(z_t): naive guidance",
    "signal_w0": "unguided (w = 0)",
}


def _trajectory_columns(data: object) -> dict[str, list[float]]:
    """``{"rows": [{step, fraction, fid_*, signal_*}, ...]}``, a bare list of rows, or ``{key: [values]}``."""
    rows = data.get("rows") if isinstance(data, dict) else data
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        keys = [k for k, v in rows[0].items() if isinstance(v, int | float)]
        return {k: [float(r.get(k, math.nan)) for r in rows] for k in keys}
    if isinstance(data, dict):
        return {
            k: [float(x) for x in v]
            for k, v in data.items()
            if isinstance(v, list) and v and all(isinstance(x, int | float) for x in v)
        }
    return {}


def plot_trajectory(cols: dict[str, list[float]], xkey: str, guided_label: str) -> bytes:
    """Figure 15: FID to real data along the steps, and the mean signal unguided vs guided (A.7)."""
    panels = {
        "FID to real data": [k for k in cols if k.startswith("fid")],
        "mean signal of D(P(z_t))": [k for k in cols if k.startswith("signal")],
    }
    panels = {t: ks for t, ks in panels.items() if ks} or {"value": [k for k in cols if k != xkey]}
    fig = Figure(figsize=(5.2 * len(panels), 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, keys) in zip(axes, panels.items(), strict=True):
        for k in keys:
            label = guided_label if k == "signal_guided" else _TRAJECTORY_LABELS.get(k, k)
            ax.plot(cols[xkey], cols[k], marker=".", label=label)
        ax.set_title(title)
        ax.set_xlabel("fraction of sampling steps" if xkey == "fraction" else xkey)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figure_png(fig)


def section_trajectory(run: RunData) -> str | None:
    """``trajectory.json`` (A.7, Figure 15): is the guidance input in distribution along the trajectory?"""
    data = _read_json(run.root / "trajectory.json")
    if data is None:
        return None
    cols = _trajectory_columns(data)
    xkey = next((k for k in ("fraction", "step", "t", "timestep") if k in cols), None)
    if xkey is None or len(cols) < 2:
        return note("Unrecognised <code>trajectory.json</code>; raw content:") + pre_json(data)
    meta = data if isinstance(data, dict) else {}
    weight = meta.get("weight")
    guided = (
        f"guided ({meta.get('signal', 'signal')}, w = {weight:g})"
        if isinstance(weight, int | float)
        else "guided"
    )
    n = len(cols[xkey])
    rows = [[*(cols[k][i] for k in cols)] for i in range(n)]
    return (
        "<p>At each sampling step, the decoded predicted clean image (the input LTG gives the classifier) "
        "and the decoded noisy state are compared with real data (Fréchet distance on the classifier's "
        "features). The paper finds the first close to real data within the first ~10% of steps, the second "
        "only at the end."
        + (f" {fmt(meta['images'])} images." if "images" in meta else "")
        + "</p>"
        + img(plot_trajectory(cols, xkey, guided), "trajectory")
        + f"<details><summary>Values ({n} steps)</summary>{table(list(cols), rows)}</details>"
    )


def _keyword_cell(value: object) -> str:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return esc(", ".join(value))
    if isinstance(value, list):
        items = "".join(f"<li>{_keyword_cell(v)}</li>" for v in value[:8])
        more = f"<li>… {len(value) - 8} more</li>" if len(value) > 8 else ""
        return f"<ul>{items}{more}</ul>"
    if isinstance(value, dict):
        return "<br>".join(f"<b>{esc(k)}</b>: {_keyword_cell(v)}" for k, v in value.items())
    return esc(value)


def section_introspection(run: RunData) -> str | None:
    """``introspection/*.json`` (section 5): longtail keywords and refined prompts per class."""
    files = sorted((run.root / "introspection").glob("*.json"))
    if not files:
        return None
    parts = []
    for path in sorted(files, key=lambda p: (p.name != "keywords.json", p.name)):
        data = _read_json(path)
        parts.append(f"<h3>{esc(path.name)}</h3>")
        if isinstance(data, dict) and data:
            parts.append(table(["class", "content"], [[esc(k), _keyword_cell(v)] for k, v in data.items()]))
        else:
            parts.append(pre_json(data))
    return "".join(parts)


# --- the page -----------------------------------------------------------------------------------------------

SectionBuilder = Callable[[RunData], "str | None"]


@dataclass(frozen=True)
class Section:
    """One part of the page; ``build`` returns HTML, raises ``Missing``, or returns ``None`` (left out)."""

    id: str
    title: str
    build: SectionBuilder


SECTIONS: list[Section] = [
    Section("overview", "Run", section_overview),
    Section("accuracy", "Accuracy by condition and group", section_accuracy),
    Section("rounds", "Accuracy per mining round", section_rounds),
    Section("detection", "Detecting rare and hard examples (Figures 5, 11)", section_detection),
    Section("sweep", "Signal and P(class) against the guidance weight (Figure 2)", section_sweep),
    Section("grids", "Unguided vs guided samples (Figure 6)", section_grids),
    Section("synthetic", "Mined synthetic data", section_synthetic),
    Section("distribution", "Synthetic vs real distribution (section 3.1)", section_distribution),
    Section("trajectory", "Along the denoising trajectory (Figure 15)", section_trajectory),
    Section("introspection", "Longtail introspection (section 4.3)", section_introspection),
]

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1180px;
padding:16px 24px;color:#1d1d1f;background:#fff;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #e3e3e8;padding-bottom:4px;margin-top:1.8em}
h3{font-size:1.05em;margin:1.2em 0 .4em}.meta{color:#666;font-size:.9em}
pre{background:#f6f6f8;border:1px solid #e3e3e8;padding:8px 10px;font-size:12px;overflow:auto}
pre.scroll{max-height:420px}.cols{display:flex;gap:20px;flex-wrap:wrap}.cols>div{flex:1 1 480px;min-width:0}
table{border-collapse:collapse;font-size:13px;margin:6px 0 10px}th,td{border:1px solid #dcdce2;
padding:3px 8px;text-align:left;vertical-align:top}th{background:#f0f0f4}.tw{overflow-x:auto}
td.num{text-align:right;white-space:nowrap}img{max-width:100%;height:auto}img.pixel{image-rendering:pixelated}
.grids{display:flex;flex-wrap:wrap;gap:24px}figure{margin:0}figcaption{text-align:center;font-size:.9em}
.note{padding:6px 10px;border-radius:4px;background:#eef4fb}
.note.missing{background:#fff6d6;border:1px solid #e8d27a}
.note.error{background:#fde8e8;border:1px solid #e39a9a}.ok{color:#1a7f37}.bad{color:#b35900;font-weight:600}
nav ul{columns:2;font-size:.92em}details{margin:6px 0}summary{cursor:pointer;color:#244f8f}
"""


def render_section(section: Section, run: RunData) -> tuple[str, str] | None:
    """``(html, status)`` of a section, status ``ok`` / ``missing`` / ``error``; ``None`` to leave it out."""
    try:
        body = section.build(run)
    except Missing as missing:
        body, status = note(f"Not in this run yet. {missing}", "missing"), "missing"
    except Exception as err:  # a broken section must not take the whole page down
        body, status = (
            note(f"Could not render this section: {esc(type(err).__name__)}: {esc(err)}", "error"),
            "error",
        )
    else:
        if body is None:
            return None
        status = "ok"
    return f'<section id="{esc(section.id)}"><h2>{esc(section.title)}</h2>{body}</section>', status


def build_html(run: RunData, sections: Sequence[Section] | None = None) -> str:
    """The whole page as a string."""
    rendered = [(s, r) for s in (SECTIONS if sections is None else sections) if (r := render_section(s, run))]
    nav = "".join(
        f'<li><a href="#{esc(s.id)}">{esc(s.title)}</a>'
        f"{' <span class=bad>(missing)</span>' if st == 'missing' else ''}"
        f"{' <span class=bad>(error)</span>' if st == 'error' else ''}</li>"
        for s, (_, st) in rendered
    )
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    seeds = esc(run.seeds or "–")
    head = (
        f"<h1>Longtail Guidance run: {esc(run.root.resolve().name)}</h1>"
        f'<p class="meta">{esc(run.root.resolve())} · report written {stamp} · seeds {seeds}</p>'
    )
    body = "".join(h for _, (h, _) in rendered)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>longtail report: '
        f"{esc(run.root.resolve().name)}</title><style>{CSS}</style></head><body>{head}"
        f"<nav><ul>{nav}</ul></nav>{body}</body></html>"
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(build_html(run, sections), encoding="utf-8")
    tmp.replace(path)
    return path
