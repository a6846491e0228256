"""The report's figures, drawn with matplotlib (``Figure`` + Agg, no pyplot); each returns PNG bytes."""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from torch import Tensor

from ..evaluation.metrics import dense_rank
from ..evaluation.stats import mean_std
from .cells import shrink_png

GROUP_KEYS = ("top1", "many", "medium", "few")
GROUP_LABELS = {"top1": "top-1", "many": "Many", "medium": "Medium", "few": "Few"}
CONDITION_COLORS = {"base": "tab:gray", "none": "tab:blue", "unguided": "tab:orange", "ltg": "tab:red"}
OTHER_COLORS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
MONTAGE_CLASSES = 20  # rows of a synthetic-image montage (large label sets show their first classes)
THUMB = 64  # longest side of a montage thumbnail, px

Rows = list[tuple[str, str, list[dict]]]  # (condition key, label, final metrics per seed)


def condition_color(cond: str, index: int = 0) -> str:
    """The same colour for a condition in every plot; others cycle through a fixed list."""
    return CONDITION_COLORS.get(cond, OTHER_COLORS[index % len(OTHER_COLORS)])


def figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def _ms(values: Sequence[float | None]) -> tuple[float, float, int]:
    """Mean, std and count for plotting: NaN where there is no finite value."""
    s = mean_std(values)
    return (
        (math.nan if s["mean"] is None else s["mean"]),
        (math.nan if s["std"] is None else s["std"]),
        s["n"],
    )


def _bars(ax: Axes, series: list[tuple[str, Sequence[float], str, Sequence[float] | None]]) -> np.ndarray:
    """Grouped bars, one per ``(label, values, colour, error bars)`` series; returns the group centres."""
    width, x = 0.8 / len(series), np.arange(len(series[0][1]))
    for i, (label, values, color, errs) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar(x + offset, values, width, yerr=errs, capsize=3, label=label, color=color)
    return x


def plot_accuracy_bars(rows: Rows) -> bytes:
    """Grouped bars: top-1 / Many / Medium / Few per condition; error bars = std over seeds."""
    fig = Figure(figsize=(9, 3.6))
    ax = fig.subplots()
    series = []
    for i, (key, label, finals) in enumerate(rows):
        stats = [_ms([f.get(k) for f in finals]) for k in GROUP_KEYS]
        errs = [s if n > 1 else 0.0 for _, s, n in stats]
        series.append((label, [m for m, _, _ in stats], condition_color(key, i), errs))
    ax.set_xticks(_bars(ax, series), [GROUP_LABELS[k] for k in GROUP_KEYS])
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure_png(fig)


def plot_rounds(histories: dict[str, tuple[str, list[list[dict]]]]) -> bytes:
    """Accuracy per mining round: a panel per group, a line per condition (mean over seeds, band = ± std)."""
    fig = Figure(figsize=(12, 3.2))
    axes = fig.subplots(1, len(GROUP_KEYS), sharex=True)
    for i, (cond, (label, per_seed)) in enumerate(histories.items()):
        rounds = sorted({h["round"] for hist in per_seed for h in hist})
        for ax, key in zip(axes, GROUP_KEYS, strict=True):
            stats = [_ms([h.get(key) for hist in per_seed for h in hist if h["round"] == r]) for r in rounds]
            m, sd = np.array([s[0] for s in stats]), np.array([s[1] for s in stats])
            color = condition_color(cond, i)
            ax.plot(rounds, m, marker="o", label=label, color=color)
            if len(per_seed) > 1:
                ax.fill_between(rounds, m - sd, m + sd, color=color, alpha=0.15)
    for ax, key in zip(axes, GROUP_KEYS, strict=True):
        ax.set_title(GROUP_LABELS[key])
        ax.set_xlabel("mining round")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_ylabel("test accuracy")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    return figure_png(fig)


def _stat(stat: object) -> tuple[float, float]:
    """Mean and error bar of a ``mean_std`` result: NaN mean when absent, no bar for fewer than two seeds."""
    stat = stat if isinstance(stat, dict) else {}
    mean, std, n = stat.get("mean"), stat.get("std"), stat.get("n") or 0
    finite = isinstance(mean, int | float) and math.isfinite(mean)
    bar = std if n > 1 and isinstance(std, int | float) and math.isfinite(std) else 0.0
    return (float(mean) if finite else math.nan), float(bar)


def plot_efficiency(efficiency: dict, labels: dict[str, str]) -> bytes:
    """The data-efficiency curve: Few accuracy against synthetic images per class (log scale), a line per
    condition (mean over seeds, error bars = std) from ``efficiency.json``'s ``table``."""
    table = efficiency["table"]
    sizes = sorted({int(n) for n in efficiency.get("sizes") or [n for row in table.values() for n in row]})
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
    for i, (cond, row) in enumerate(table.items()):
        stats = [_stat(((row or {}).get(str(n)) or {}).get("few")) for n in sizes]
        ax.errorbar(sizes, [m for m, _ in stats], yerr=[e for _, e in stats], marker="o", capsize=3,
                    color=condition_color(cond, i), label=labels.get(cond, cond))
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("synthetic images per class")
    ax.set_ylabel("Few test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure_png(fig)


def plot_roc(scores: dict[str, Tensor]) -> tuple[bytes, dict[str, dict[str, float]]]:
    """ROC curves of every signal for rare (Few-class) and hard (misclassified) test images (Figure 5)."""
    from torchmetrics.functional.classification import binary_roc

    from ..evaluation.metrics import auroc

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


def plot_sweep(sweep: dict) -> bytes:
    """Figure 2: mean signal and mean P(class) of generated images against the guidance weight, per signal."""
    points, choices = sweep["points"], sweep.get("choices") or {}
    signals = list(dict.fromkeys(p["signal"] for p in points))
    positive = [p["weight"] for p in points if p["weight"] > 0]
    fig = Figure(figsize=(10, 2.8 * len(signals)), layout="constrained")
    axes = fig.subplots(len(signals), 2, squeeze=False)
    for row, sig in zip(axes, signals, strict=True):
        pts = sorted((p for p in points if p["signal"] == sig), key=lambda p: p["weight"])
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


def plot_by_weight(stats: dict[float, dict[str, float | None]], signal: str) -> bytes:
    """A generated set's mean signal and mean P(class) against the guidance weight it was generated with."""
    w = sorted(stats)
    fig = Figure(figsize=(9, 2.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(w, [stats[x]["signal"] for x in w], marker="o", color="tab:red")
    left.set_ylabel(f"mean {signal}")
    right.plot(w, [stats[x]["p_class"] for x in w], marker="o")
    right.set_ylabel("mean P(intended class)")
    right.set_ylim(-0.02, 1.02)
    for ax in (left, right):
        ax.set_xlabel("guidance weight w")
        ax.grid(alpha=0.3)
    return figure_png(fig)


def grid_geometry(width: int, height: int, rows: int, columns: int) -> tuple[int, int] | None:
    """``(cell, tiles per row)`` of a sweep grid (``longtail.calibrate.save_grid``: padding 2, square images,
    one row per class, each tile ``columns`` images wide), or ``None`` if the size does not fit it."""
    if rows <= 0 or columns <= 0 or (height - 2) % rows:
        return None
    cell = (height - 2) // rows - 2
    tile = columns * cell + 2
    if cell <= 0 or (width - 2) % tile:
        return None
    return cell, (width - 2) // tile


def plot_grid(png: bytes, class_names: Sequence[str], weights: Sequence[float | str], height: int = 760) -> bytes:
    """Redraw a sweep grid about ``height`` px tall (integer zoom) with class names on the rows and the weight
    (or a column label, when a string) above each image column; the PNG unchanged if its size does not match
    the sweep's layout."""
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    h, w = pixels.shape[:2]
    scale = max(1, min(4, height // h)) if h <= height else height / h  # pixel-exact zoom, or shrink
    geometry = grid_geometry(w, h, len(class_names), len(weights))
    if geometry is None:
        return shrink_png(png, 2 * height)
    cell, tiles = geometry
    fig = Figure(figsize=(w * scale / 100, h * scale / 100))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(pixels, interpolation="nearest" if scale >= 1 else "antialiased")
    n = len(weights)
    ys = [2 + r * (cell + 2) + cell / 2 for r in range(len(class_names))]
    xs = [2 + t * (n * cell + 2) + j * cell + cell / 2 for t in range(tiles) for j in range(n)]
    ax.set_yticks(ys, list(class_names), fontsize=9)
    names = [wt if isinstance(wt, str) else ("0" if wt == 0 else f"{wt:g}") for wt in weights]
    ax.set_xticks(xs, [name for _ in range(tiles) for name in names], fontsize=8,
                  rotation=0 if all(len(n) <= 5 for n in names) else 60, ha="left" if len(max(names, key=len)) > 5 else "center")
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return figure_png(fig)


def montage(store_dir: Path, rows: list[dict], num_classes: int, per_class: int = 6) -> np.ndarray | None:
    """RGB montage ``[H, W, 3]``: a row per class (up to ``MONTAGE_CLASSES``), up to ``per_class`` thumbnails
    of the last round's images each, padding 2."""
    from PIL import Image

    if not rows:
        return None
    num_classes = min(num_classes, MONTAGE_CLASSES)
    last = max(int(r.get("round") or 0) for r in rows)
    last_rows = [r for r in rows if int(r.get("round") or 0) == last]
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
    size = (width * len(montages) + 1.2, first.shape[0] * zoom / 100 + 0.6)
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(1, len(montages), squeeze=False)[0]
    for i, (ax, (label, canvas)) in enumerate(zip(axes, montages.items(), strict=True)):
        ax.imshow(canvas, interpolation="nearest")
        h = (canvas.shape[0] - 2) / rows
        names = list(class_names[:rows]) if i == 0 else [""] * rows
        ax.set_yticks([2 + r * h + h / 2 - 1 for r in range(rows)], names, fontsize=8)
        ax.set_xticks([])
        ax.tick_params(length=0)
        ax.set_title(label, fontsize=9)
    return figure_png(fig)


def plot_distribution(reports: dict[str, list[dict]], labels: dict[str, str]) -> bytes:
    """Per class: synthetic-vs-real FID within the class against real-vs-real between classes (mean over
    seeds); grouped bars up to 30 classes, else a scatter (below the diagonal = the paper's claim holds)."""
    first = next(iter(reports.values()))[0]
    names = list(first["per_class"])
    between = [first["per_class"][n]["between_real"]["fid_mean"] for n in names]
    within = {
        k: [_ms([r["per_class"][n]["fid"] for r in reps])[0] for n in names] for k, reps in reports.items()
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
        series = [(f"{labels[k]} vs real (same class)", vals, colors[k], None) for k, vals in within.items()]
        series.append(("real vs real (other classes, mean)", between, "tab:gray", None))
        ax.set_xticks(_bars(ax, series), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("Fréchet distance")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure_png(fig)


TRAJECTORY_LABELS = {
    "fid_predicted_clean": "decoded predicted clean D(P(z_t)): what LTG scores",
    "fid_noisy": "decoded noisy state D(z_t): naive guidance",
    "signal_w0": "unguided (w = 0)",
}


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
            label = guided_label if k == "signal_guided" else TRAJECTORY_LABELS.get(k, k)
            ax.plot(cols[xkey], cols[k], marker=".", label=label)
        ax.set_title(title)
        ax.set_xlabel("fraction of sampling steps" if xkey == "fraction" else xkey)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figure_png(fig)
