"""Choosing the guidance weight by the paper's rule (section 3.1), for any generator.

Sweep weights per signal, measure the mean signal and the mean P(intended class) of the generated images
against the unguided baseline (w = 0), and keep the weight whose images are most longtail while staying in
distribution: signal higher than unguided, P(class) lower than unguided but at least ``min_p_ratio`` of it.
The right scale is model dependent (the paper's 10-50 for Stable Diffusion at 512 px are far too strong for
a 32 px latent model), which is why this is a measurement and not a constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from .evaluation.metrics import signal_scores
from .generate import Generated
from .sampling import GuidanceConfig

RunFn = Callable[[GuidanceConfig | None], Generated]


@dataclass
class SweepPoint:
    """Mean signal / P(class) / accuracy of the images generated with one (signal, weight)."""

    signal: str
    weight: float
    mean_signal: float
    mean_p_class: float
    accuracy: float
    n: int
    seconds: float
    nonfinite: int = 0


def _point(signal: str, weight: float, gen: Generated) -> SweepPoint:
    if gen.output is None or gen.p_class is None:
        raise ValueError("calibration needs a classifier and labels in the generation run")
    score = signal_scores(gen.output, [signal])[signal]
    return SweepPoint(signal, weight, float(score.mean()), float(gen.p_class.mean()),
                      float((gen.pred == gen.labels).float().mean()), len(gen), gen.seconds, gen.nonfinite)


def sweep(
    run: RunFn, signals: Sequence[str], weights: Sequence[float], base: GuidanceConfig | None = None,
    on_point: Callable[[SweepPoint], None] | None = None,
) -> list[SweepPoint]:
    """Unguided once (its images scored under every signal: the w = 0 rows), then each (signal, w > 0)."""
    base = base or GuidanceConfig()
    unguided = run(None)
    points = [_point(s, 0.0, unguided) for s in signals]
    for p in points:
        if on_point:
            on_point(p)
    for s in signals:
        for w in weights:
            if w == 0:
                continue
            cfg = GuidanceConfig(**{**asdict(base), "signal": s, "weight": float(w)})
            p = _point(s, float(w), run(cfg))
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


def choose_weight(points: Sequence[SweepPoint], signal: str, min_p_ratio: float = 0.5) -> WeightChoice:
    """Paper 3.1: signal above unguided, P(class) below unguided but >= ``min_p_ratio`` x unguided; max signal."""
    rows = [p for p in points if p.signal == signal]
    base = next((p for p in rows if p.weight == 0.0), None)
    if base is None:
        raise ValueError(f"no unguided (w = 0) point for signal {signal!r}")
    ok = [p for p in rows if p.weight > 0 and p.mean_signal > base.mean_signal
          and min_p_ratio * base.mean_p_class <= p.mean_p_class < base.mean_p_class]
    if not ok:
        return WeightChoice(signal, None, f"no weight raised {signal} while keeping P(class) within "
                            f"[{min_p_ratio:g} x unguided, unguided)", base.mean_signal, base.mean_p_class)
    best = max(ok, key=lambda p: p.mean_signal)
    reason = (f"w={best.weight:g}: {signal} {base.mean_signal:.3f} -> {best.mean_signal:.3f}, "
              f"P(class) {base.mean_p_class:.3f} -> {best.mean_p_class:.3f} (>= {min_p_ratio:g} x unguided)")
    return WeightChoice(signal, best.weight, reason, base.mean_signal, base.mean_p_class)


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
) -> dict:
    """Sweep, choose a weight per signal, and record the evidence in ``out_dir``: a grid per signal.

    ``generate_fn(guidance or None)`` generates the same jobs each time (``labels [N]`` their classes). Returns
    ``{"points", "choices", "timing", "grid_weights"}``; the caller writes it where it belongs.
    """
    images: dict[tuple[str, float], Tensor] = {}

    def run(guidance: GuidanceConfig | None) -> Generated:
        gen = generate_fn(guidance)
        images[(guidance.signal, guidance.weight) if guidance else ("", 0.0)] = gen.images.cpu()
        return gen

    def show(p: SweepPoint) -> None:
        if log is not None:
            log(f"  sweep {p.signal:9s} w={p.weight:<5g} signal {p.mean_signal:.3f}  P(class) {p.mean_p_class:.3f}  "
                f"acc {p.accuracy:.3f}  {p.n / p.seconds:.1f} img/s")

    points = sweep(run, signals, weights, base=base, on_point=show)
    choices = {s: asdict(choose_weight(points, s, min_p_ratio)) for s in signals}
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
    return {"points": [asdict(p) for p in points], "choices": choices, "timing": timing, "grid_weights": grid_weights}
