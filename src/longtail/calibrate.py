"""Choosing the guidance weight by the paper's rule (section 3.1), for any generator.

Sweep weights per signal, measure the mean signal and the mean P(intended class) of the generated images
against the unguided baseline (w = 0), and keep the weight whose images are most longtail while staying in
distribution: signal higher than unguided, P(class) lower than unguided but at least ``min_p_ratio`` of it.

That rule is judged by the classifier being fooled, so it cannot tell "hard for the classifier" from "broken
image". With a ``judge`` (``longtail.evaluation.judge``: an independent classifier, or CLIP zero-shot) every
sweep point also records the judge's accuracy and P(class) (and, given real reference images, the judge's k-NN
precision: the share of generated images inside the real manifold), and ``min_judge_ratio`` adds the
constraint: judge accuracy at least ``min_judge_ratio`` x the unguided judge accuracy.
The right scale is model dependent (the paper's 10-50 for Stable Diffusion at 512 px are far too strong for
a 32 px latent model), which is why this is a measurement and not a constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .evaluation.metrics import signal_scores
from .generate import Generated
from .sampling import GuidanceConfig

if TYPE_CHECKING:
    from .evaluation.judge import Judge

RunFn = Callable[[GuidanceConfig | None], Generated]


@dataclass
class SweepPoint:
    """Mean signal / P(class) / accuracy of the images generated with one (signal, weight).

    With a judge: ``judge_accuracy`` / ``judge_p_class`` (the judge's accuracy and mean P(intended class)) and,
    given real reference images, ``judge_precision`` (k-NN precision in the judge's feature space); else None.
    """

    signal: str
    weight: float
    mean_signal: float
    mean_p_class: float
    accuracy: float
    n: int
    seconds: float
    nonfinite: int = 0
    judge_accuracy: float | None = None
    judge_p_class: float | None = None
    judge_precision: float | None = None


def _point(signal: str, weight: float, gen: Generated, judged: dict[str, float] | None = None) -> SweepPoint:
    if gen.output is None or gen.p_class is None:
        raise ValueError("calibration needs a classifier and labels in the generation run")
    score = signal_scores(gen.output, [signal])[signal]
    return SweepPoint(signal, weight, float(score.mean()), float(gen.p_class.mean()),
                      float((gen.pred == gen.labels).float().mean()), len(gen), gen.seconds, gen.nonfinite,
                      **(judged or {}))


def _judged(judge: Judge, gen: Generated, real_feats: Tensor | None, real_labels: Tensor | None,
            k: int) -> dict[str, float]:
    """The judge's columns of a sweep point: accuracy, P(class) and (with a real reference) k-NN precision."""
    from .evaluation.judge import realism_from_features

    scored = judge.score(gen.images, gen.labels)
    out = {"judge_accuracy": scored["accuracy"], "judge_p_class": scored["p_class"]}
    if real_feats is not None:
        fake = judge.features(gen.images)
        out["judge_precision"] = realism_from_features(fake, real_feats, gen.labels, real_labels, k)["precision"]
    return out


def sweep(
    run: RunFn, signals: Sequence[str], weights: Sequence[float], base: GuidanceConfig | None = None,
    on_point: Callable[[SweepPoint], None] | None = None, *, judge: Judge | None = None,
    real_images: Tensor | None = None, real_labels: Tensor | None = None, k: int = 3,
) -> list[SweepPoint]:
    """Unguided once (its images scored under every signal: the w = 0 rows), then each (signal, w > 0).

    ``judge``: also score every point with it (``judge_accuracy``, ``judge_p_class``); ``real_images
    [N, C, H, W]`` in [-1, 1] (with ``real_labels [N]``: the reference is restricted to the generated classes)
    add ``judge_precision`` (k-NN with ``k``; NaN when a set has ``<= k`` images). Raises ``ValueError`` for
    real images without a judge.
    """
    if real_images is not None and judge is None:
        raise ValueError("real reference images need a judge (their features are the judge's)")
    base = base or GuidanceConfig()
    real_feats = judge.features(real_images) if judge is not None and real_images is not None else None

    def judged(gen: Generated) -> dict[str, float] | None:
        return _judged(judge, gen, real_feats, real_labels, k) if judge is not None else None

    unguided = run(None)
    unguided_judged = judged(unguided)
    points = [_point(s, 0.0, unguided, unguided_judged) for s in signals]
    for p in points:
        if on_point:
            on_point(p)
    for s in signals:
        for w in weights:
            if w == 0:
                continue
            cfg = GuidanceConfig(**{**asdict(base), "signal": s, "weight": float(w)})
            gen = run(cfg)
            p = _point(s, float(w), gen, judged(gen))
            points.append(p)
            if on_point:
                on_point(p)
    return points


@dataclass
class WeightChoice:
    """The chosen weight for a signal and why (``None`` weight when no swept weight passes the rule)."""

    signal: str
    weight: float | None
    reason: str
    baseline_signal: float
    baseline_p_class: float
    baseline_judge_accuracy: float | None = None


def choose_weight(
    points: Sequence[SweepPoint], signal: str, min_p_ratio: float = 0.5, min_judge_ratio: float | None = None,
) -> WeightChoice:
    """Paper 3.1: signal above unguided, P(class) below unguided but >= ``min_p_ratio`` x unguided; max signal.

    ``min_judge_ratio`` (None: the paper's rule alone): also require the judge's accuracy to stay at least
    ``min_judge_ratio`` x the unguided judge accuracy, so a weight that breaks the images (the judge no longer
    recognises the class) is refused even when it fools the guided classifier nicely. Raises ``ValueError``
    without an unguided point for ``signal``, or with ``min_judge_ratio`` but no judge columns in the points.
    """
    rows = [p for p in points if p.signal == signal]
    base = next((p for p in rows if p.weight == 0.0), None)
    if base is None:
        raise ValueError(f"no unguided (w = 0) point for signal {signal!r}")
    ok = [p for p in rows if p.weight > 0 and p.mean_signal > base.mean_signal
          and min_p_ratio * base.mean_p_class <= p.mean_p_class < base.mean_p_class]
    judge_note = ""
    if min_judge_ratio is not None:
        if base.judge_accuracy is None or any(p.judge_accuracy is None for p in rows):
            raise ValueError(f"min_judge_ratio needs judge_accuracy at every {signal!r} point: sweep with a judge")
        floor = min_judge_ratio * base.judge_accuracy
        ok = [p for p in ok if p.judge_accuracy >= floor]
        judge_note = f" and judge accuracy >= {min_judge_ratio:g} x unguided ({floor:.3f})"
    if not ok:
        return WeightChoice(signal, None, f"no weight raised {signal} while keeping P(class) within "
                            f"[{min_p_ratio:g} x unguided, unguided){judge_note}", base.mean_signal,
                            base.mean_p_class, base.judge_accuracy)
    best = max(ok, key=lambda p: p.mean_signal)
    reason = (f"w={best.weight:g}: {signal} {base.mean_signal:.3f} -> {best.mean_signal:.3f}, "
              f"P(class) {base.mean_p_class:.3f} -> {best.mean_p_class:.3f} (>= {min_p_ratio:g} x unguided)")
    if min_judge_ratio is not None:
        reason += (f", judge accuracy {base.judge_accuracy:.3f} -> {best.judge_accuracy:.3f} "
                   f"(>= {min_judge_ratio:g} x unguided)")
    return WeightChoice(signal, best.weight, reason, base.mean_signal, base.mean_p_class, base.judge_accuracy)


_JUDGE_FIELDS = ("judge_accuracy", "judge_p_class", "judge_precision", "baseline_judge_accuracy")


def _row(obj: SweepPoint | WeightChoice) -> dict:
    """A point or choice as a JSON-ready dict; judge fields left out when unset (no judge: the same rows as
    before judges existed)."""
    return {k: v for k, v in asdict(obj).items() if not (k in _JUDGE_FIELDS and v is None)}


def save_grid(images_by_weight: dict[float, Tensor], labels: Tensor, path: Path, per_class: int) -> None:
    """PNG grid of the sweep: per class ``per_class`` rows; each row shows one seed at every weight, unguided
    first, left to right. Images ``[N, C, H, W]`` in [-1, 1] per weight, same jobs in every weight."""
    from torchvision.utils import save_image

    weights = sorted(images_by_weight)
    rows = []
    for c in range(int(labels.max()) + 1):
        idx = (labels == c).nonzero().flatten()[:per_class]
        rows.extend(torch.cat([images_by_weight[w][i] for w in weights], dim=-1) for i in idx)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.stack(rows).clamp(-1, 1) * 0.5 + 0.5, path, nrow=per_class, padding=2, pad_value=0.5)


def calibrate(
    generate_fn: RunFn,
    labels: Tensor,
    signals: Sequence[str],
    weights: Sequence[float],
    out_dir: Path,
    *,
    base: GuidanceConfig | None = None,
    min_p_ratio: float = 0.5,
    per_class_in_grid: int = 2,
    log: Callable[[str], None] | None = None,
    judge: Judge | None = None,
    real_images: Tensor | None = None,
    real_labels: Tensor | None = None,
    min_judge_ratio: float | None = None,
    class_names: Sequence[str] | None = None,
    options: Sequence[dict] = (),
    option_signal: str | None = None,
) -> dict:
    """Sweep, choose a weight per signal, and record the evidence in ``out_dir``: a grid per signal.

    ``options`` (guidance options of :meth:`GuidanceConfig.with_options`, e.g. ``[{"views": 4},
    {"lowpass": 1.0}]``): ``option_signal`` (default: the first of ``signals``) at its chosen weight (the
    smallest swept weight when the rule passed none) is generated again with each option; the result gains ``"options"`` (one scored row per
    option, with ``seconds`` for its cost against unguided) and ``grid_options.png`` shows, per class,
    unguided, plain LTG and each option side by side (:func:`compare_options`).

    ``generate_fn(guidance or None)`` generates the same jobs each time (``labels [N]`` their classes). Returns
    ``{"points", "choices", "timing", "grid_weights"}``; the caller writes it where it belongs.

    ``judge`` (+ ``real_images [N, C, H, W]`` in [-1, 1], ``real_labels [N]``): every point gains the judge's
    columns (``sweep``) and the result a ``"judge"`` entry (its description and ``min_judge_ratio``);
    ``min_judge_ratio`` adds the judge constraint to the rule (``choose_weight``). ``class_names``: the run's
    classes, checked against the judge's. Raises ``ValueError`` when they differ (naming both lists), or for
    ``min_judge_ratio`` / ``real_images`` without a judge.
    """
    if judge is None and (min_judge_ratio is not None or real_images is not None):
        raise ValueError("min_judge_ratio and real_images need a judge")
    if judge is not None and class_names is not None:
        judge.check_classes(class_names)
    images: dict[tuple[str, float], Tensor] = {}

    def run(guidance: GuidanceConfig | None) -> Generated:
        gen = generate_fn(guidance)
        images[(guidance.signal, guidance.weight) if guidance else ("", 0.0)] = gen.images.cpu()
        return gen

    def show(p: SweepPoint) -> None:
        if log is not None:
            judged = ""
            if p.judge_accuracy is not None:
                judged = f"  judge acc {p.judge_accuracy:.3f}  judge P(class) {p.judge_p_class:.3f}"
                if p.judge_precision is not None:
                    judged += f"  judge precision {p.judge_precision:.3f}"
            log(f"  sweep {p.signal:9s} w={p.weight:<5g} signal {p.mean_signal:.3f}  P(class) {p.mean_p_class:.3f}  "
                f"acc {p.accuracy:.3f}{judged}  {p.n / p.seconds:.1f} img/s")

    points = sweep(run, signals, weights, base=base, on_point=show, judge=judge, real_images=real_images,
                   real_labels=real_labels)
    choices = {s: _row(choose_weight(points, s, min_p_ratio, min_judge_ratio)) for s in signals}
    guided = [p for p in points if p.weight > 0]
    timing = {"unguided_img_per_s": points[0].n / points[0].seconds,
              "guided_img_per_s": sum(p.n for p in guided) / sum(p.seconds for p in guided) if guided else math.nan}
    timing["slowdown"] = timing["unguided_img_per_s"] / timing["guided_img_per_s"] if guided else math.nan
    grid_weights = [0.0, *[float(w) for w in weights if w > 0]]
    for sig in signals:
        grid = {w: images[("", 0.0) if w == 0 else (sig, w)] for w in grid_weights}
        save_grid(grid, labels, out_dir / f"grid_{sig}.png", per_class=per_class_in_grid)
    if log is not None:
        for sig, choice in choices.items():
            log(f"  weight for {sig}: {choice['reason']}")
        log(f"  generation: unguided {timing['unguided_img_per_s']:.1f} img/s, guided "
            f"{timing['guided_img_per_s']:.1f} img/s ({timing['slowdown']:.1f}x slower)")
    result = {"points": [_row(p) for p in points], "choices": choices, "timing": timing,
              "grid_weights": grid_weights}
    if options:
        sig = option_signal or signals[0]
        if sig not in choices:
            raise ValueError(f"option_signal {sig!r} is not among the swept signals {list(signals)}")
        weight = choices[sig]["weight"] or min(float(w) for w in weights if w > 0)
        plain = GuidanceConfig(**{**asdict(base or GuidanceConfig()), "signal": sig, "weight": float(weight)})
        result["options"] = compare_options(
            generate_fn, labels, plain, options, out_dir, reference={"unguided": images[("", 0.0)],
                                                                      f"w = {weight:g}": images[(sig, weight)]},
            judge=judge, real_images=real_images, real_labels=real_labels, per_class_in_grid=per_class_in_grid,
            log=log)
    if judge is not None:
        result["judge"] = {**judge.info(), "min_judge_ratio": min_judge_ratio,
                           "real_reference": int(real_images.shape[0]) if real_images is not None else 0}
    return result


def option_label(option: dict) -> str:
    """``{"views": 4, "lowpass": 1.0}`` -> ``"views=4, lowpass=1"``."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in option.items())


def compare_options(
    generate_fn: RunFn, labels: Tensor, guidance: GuidanceConfig, options: Sequence[dict], out_dir: Path, *,
    reference: dict[str, Tensor], judge: Judge | None = None, real_images: Tensor | None = None,
    real_labels: Tensor | None = None, per_class_in_grid: int = 2, k: int = 3,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Generate the jobs of ``generate_fn`` with ``guidance`` plus each of ``options`` and score them as sweep
    points (signal, P(class), accuracy, judge columns when there is a judge, ``seconds`` for the cost).

    ``reference``: already generated images ``[N, C, H, W]`` of the same jobs (e.g. unguided and plain LTG),
    drawn first in ``out_dir/grid_options.png``; then one column per option. Returns ``{"signal", "weight",
    "columns", "points"}``. Raises ``ValueError`` for an unknown or invalid option (before generating).
    """
    checked = [(option_label(o), guidance.with_options(**o)) for o in options]
    real_feats = judge.features(real_images) if judge is not None and real_images is not None else None
    rows, grid = [], {float(i): x.cpu() for i, x in enumerate(reference.values())}
    for name, g in checked:
        gen = generate_fn(g)
        judged = _judged(judge, gen, real_feats, real_labels, k) if judge is not None else None
        point = _point(guidance.signal, guidance.weight, gen, judged)
        rows.append({"option": name, **_row(point)})
        grid[float(len(grid))] = gen.images.cpu()
        if log is not None:
            extra = f"  judge acc {point.judge_accuracy:.3f}" if point.judge_accuracy is not None else ""
            log(f"  option {name:<22} signal {point.mean_signal:.3f}  P(class) {point.mean_p_class:.3f}{extra}  "
                f"{point.n / point.seconds:.1f} img/s")
    save_grid(grid, labels, out_dir / "grid_options.png", per_class=per_class_in_grid)
    return {"signal": guidance.signal, "weight": guidance.weight,
            "columns": [*reference, *(name for name, _ in checked)], "points": rows}
