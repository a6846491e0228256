"""Summary statistics over seeds: mean ± std, and the table cell that prints it (one implementation)."""

from __future__ import annotations

import math
from collections.abc import Sequence


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


def mean_std_cell(stat: dict, width: int = 14, digits: int = 3) -> str:
    """A right-aligned table cell: ``mean ± std`` over seeds, the mean alone for one seed, ``-`` for none."""
    if stat.get("mean") is None:
        text = "-"
    else:
        text = f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")
    return f"{text:>{width}}"
