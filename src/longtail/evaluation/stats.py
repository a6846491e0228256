"""Statistics over seeds: mean ± std and its table cell, paired differences between conditions with a Student-t
confidence interval (``paired_difference``, ``paired_table``), and a hard test split (``hard_examples``)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

Seed = TypeVar("Seed", bound=Hashable)


def mean_std(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """``{"mean", "std", "n"}`` over the finite entries of ``values`` (NaN and ``None`` are left out).

    ``std`` is the sample standard deviation (n - 1), 0 for one value; ``mean`` and ``std`` are ``None`` when
    no entry is finite, and ``n`` counts the finite entries.
    """
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(finite)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(finite) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def number_cell(value: float | None, digits: int = 3, width: int = 0) -> str:
    """``value`` with ``digits`` decimals right-aligned in ``width``; ``n/a`` for an undefined figure (None,
    NaN or infinite), never ``nan``."""
    if value is None or not math.isfinite(value):
        return f"{'n/a':>{width}}"
    return f"{value:>{width}.{digits}f}"


def mean_std_cell(stat: dict, width: int = 14, digits: int = 3) -> str:
    """A right-aligned table cell: ``mean ± std`` over seeds, the mean alone for one seed, ``-`` for none."""
    if stat.get("mean") is None:
        text = "-"
    else:
        text = f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")
    return f"{text:>{width}}"


# --- paired comparison over seeds ------------------------------------------------------------------------

_EPS = 1e-15
_TINY = 1e-300


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function, by the modified Lentz method.

    Numerical Recipes (Press et al., 3rd ed., section 6.4, ``betacf``); converges fast for
    ``x < (a + 1) / (a + b + 2)``.
    """
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),  # even step
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),  # odd step
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _TINY else _TINY
            delta = d * c
            h *= delta
        if abs(delta - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b) = B(x; a, b) / B(a, b)`` for ``a, b > 0``.

    ``I_x(a, b) = x^a (1 - x)^b / (a B(a, b)) * CF(a, b, x)`` with ``CF`` the continued fraction, and the
    symmetry ``I_x(a, b) = 1 - I_{1-x}(b, a)`` where the fraction would converge slowly (Numerical Recipes
    section 6.4; Abramowitz & Stegun 26.5.8). Pure ``math``: ``torch.special`` has no ``betainc``.
    """
    if a <= 0 or b <= 0:
        raise ValueError(f"regularized_beta needs a, b > 0, got a={a}, b={b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution function with ``df`` degrees of freedom.

    ``F(t) = 1 - I_{df / (df + t^2)}(df / 2, 1 / 2) / 2`` for ``t >= 0``, ``F(-t) = 1 - F(t)``
    (Abramowitz & Stegun 26.7.1 with 26.5.27).
    """
    if not df > 0:
        raise ValueError(f"t_cdf needs df > 0, got {df}")
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom: the ``t`` with ``t_cdf(t, df) = p``.

    ``torch.distributions.StudentT.icdf`` is not implemented (torch 2.x) and scipy is only a dev dependency,
    so this inverts ``t_cdf`` by bisection (it is increasing in ``t``): the upper end doubles from 1 until
    it passes ``p``, then 200 halvings or a relative width of 1e-13. Negative ``p < 0.5`` by symmetry.
    ``t_quantile(0.975, 2) = 4.302653`` (two-sided 95%, 2 degrees of freedom).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    if not (df > 0 and math.isfinite(df)):
        raise ValueError(f"t_quantile needs a finite df > 0, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
        if hi > 1e300:
            raise ArithmeticError(f"t_quantile({p}, {df}) is beyond float range")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def paired_difference(
    a: Mapping[Seed, float], b: Mapping[Seed, float], level: float = 0.95
) -> dict[str, Any]:
    """Paired comparison of ``a`` and ``b`` over the seeds both have (finite values only; others left out).

    With ``d_s = a_s - b_s`` over those ``n`` seeds (in ``a``'s order): ``mean = sum(d) / n``,
    ``sd = sqrt(sum((d - mean)^2) / (n - 1))`` and the ``level`` confidence interval of the mean from
    Student's t, ``mean ± t_{(1 + level) / 2, n - 1} * sd / sqrt(n)`` (the paired t interval; e.g. Wasserman,
    *All of Statistics*, 10.7, or any statistics text). Every condition of a seed starts from that seed's base
    classifier, so pairing by seed removes the base classifier's share of the variance.

    Returns ``{"n", "mean", "sd", "level", "ci", "wins", "losses", "ties", "differences"}``: ``ci`` is
    ``[low, high]``, ``None`` when ``n < 2``; ``mean`` / ``sd`` are ``None`` when ``n == 0``; ``wins`` counts
    seeds with ``a > b``, ``losses`` ``a < b``, ``ties`` ``a == b`` (exactly); ``differences`` is
    ``{seed: d_s}``.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    diffs = {s: float(a[s]) - float(b[s]) for s in a if s in b and _finite(a[s]) and _finite(b[s])}
    values = list(diffs.values())
    n = len(values)
    out: dict[str, Any] = {
        "n": n,
        "mean": None,
        "sd": None,
        "level": level,
        "ci": None,
        "wins": sum(d > 0 for d in values),
        "losses": sum(d < 0 for d in values),
        "ties": sum(d == 0 for d in values),
        "differences": diffs,
    }
    if n == 0:
        return out
    stat = mean_std(values)
    out["mean"], out["sd"] = stat["mean"], stat["std"]
    if n > 1:
        half = t_quantile((1.0 + level) / 2.0, n - 1) * stat["std"] / math.sqrt(n)
        out["ci"] = [stat["mean"] - half, stat["mean"] + half]
    return out


def paired_table(
    per_seed_finals: Mapping[Seed, Mapping[str, Mapping[str, float]]],
    baseline: str = "unguided",
    metrics: Sequence[str] = ("few", "medium", "top1"),
    level: float = 0.95,
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{condition: {metric: paired_difference(condition, baseline)}}`` for every condition but ``baseline``.

    ``per_seed_finals`` is ``seed -> condition -> final metrics`` (the last round's dict of each mining
    history: ``{s: {c: history[-1] for c, history in mining[s].items()} for s in seeds}``). Conditions are in
    order of first appearance; a seed without the baseline, or without the condition or metric, is left out
    of that pair. ``{}`` when no seed has the baseline.
    """
    if not any(baseline in finals for finals in per_seed_finals.values()):
        return {}
    conditions = list(
        dict.fromkeys(c for finals in per_seed_finals.values() for c in finals if c != baseline)
    )

    def column(cond: str, metric: str) -> dict[Seed, float]:
        return {
            s: finals[cond][metric]
            for s, finals in per_seed_finals.items()
            if cond in finals and metric in finals[cond]
        }

    return {
        c: {m: paired_difference(column(c, m), column(baseline, m), level) for m in metrics}
        for c in conditions
    }


# --- a hard test split (the analog of ImageNet-A) ---------------------------------------------------------


def hard_examples(correct_by_seed: Mapping[Seed, Tensor], min_wrong: float = 0.5) -> Tensor:
    """``[N]`` bool: the test examples that at least ``min_wrong`` of the base classifiers get wrong.

    ``correct_by_seed`` maps each seed to its base classifier's ``[N]`` bool "prediction is right" on the
    same test set (same order). Example ``i`` is hard when ``#{s: not correct_s[i]} / S >= min_wrong`` over
    the ``S`` seeds: a split selected by adversarial filtering against the classifier family, as ImageNet-A
    (Hendrycks et al., 2021, "Natural Adversarial Examples") is selected against ResNet-50. Accuracy on it
    is biased low for the classifiers that selected it; compare conditions on it, not with other splits.
    """
    if not correct_by_seed:
        raise ValueError("hard_examples needs at least one seed")
    if not 0.0 < min_wrong <= 1.0:
        raise ValueError(f"min_wrong must be in (0, 1], got {min_wrong}")
    stacked = []
    for seed, correct in correct_by_seed.items():
        if correct.dim() != 1:
            raise ValueError(f"seed {seed}: correct must be [N], got shape {tuple(correct.shape)}")
        stacked.append(correct.bool())
    shapes = {tuple(c.shape) for c in stacked}
    if len(shapes) > 1:
        raise ValueError(f"every seed must score the same test set; got shapes {sorted(shapes)}")
    wrong = (~torch.stack(stacked)).sum(0).double()
    return wrong >= min_wrong * len(stacked) - 1e-9  # integer count against the threshold, float-safe


def accuracy_on(mask: Tensor, correct: Tensor) -> float:
    """``sum(correct & mask) / sum(mask)``: accuracy on the examples ``mask`` selects; NaN for an empty mask
    (``mean_std`` leaves NaN out)."""
    if mask.shape != correct.shape:
        raise ValueError(f"mask {tuple(mask.shape)} and correct {tuple(correct.shape)} differ in shape")
    mask = mask.bool()
    n = int(mask.sum())
    return float((correct.bool() & mask).sum()) / n if n else math.nan
