"""How close synthetic data is to real data, on feature vectors ``[N, D]`` (METHOD.md section 6).

- Fréchet distance (the FID formula, paper Eq. 13, on any features: Inception pool3 gives FID proper);
- improved precision / recall (Kynkäänniemi et al. 2019): k-NN balls around each sample approximate the
  support ("manifold") of a set; precision is the share of synthetic samples inside the real manifold,
  recall the share of real samples inside the synthetic one;
- ``distribution_report``: both per class and overall, plus the paper's section 3.1 reference: synthetic
  vs real *within* a class should score better than real vs real *between* classes.

All arithmetic is float64 on the CPU.

Small samples. Every score carries its sample counts (``n_real``, ``n_fake``) and ``reliable``; below these
minimums it is ``"reliable": false`` with the ``reason``, and ``distribution_report`` logs a warning:

- FID on ``D``-dimensional features needs more than ``D`` images per set: a covariance estimated from ``N``
  samples has rank at most ``N - 1``, so with ``N <= D`` it is singular and the matrix square root in Eq. 13
  is dominated by the missing directions (FID then mostly measures the sample size);
- precision / recall need ``MIN_PR_SAMPLES`` per set: k-NN radii from a few samples are large, so both
  scores drift towards 1 whatever the data (Kynkäänniemi et al. use 50k samples and k = 3).

A score that cannot be computed at all is NaN (``null`` in JSON) with ``<key>_reason`` beside it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

MIN_PR_SAMPLES = 100  # per set, for precision / recall to count as reliable (see the module docstring)


def _as_f64(feats: Tensor, name: str) -> Tensor:
    feats = torch.as_tensor(feats)
    if feats.ndim != 2:
        raise ValueError(f"{name} must be [N, D] feature vectors, got shape {tuple(feats.shape)}")
    return feats.detach().to("cpu", torch.float64)


def feature_stats(feats: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of features ``[N, D]``, ``N >= 2``."""
    x = _as_f64(feats, "feats")
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {x.shape[0]}")
    mu = x.mean(dim=0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(sigma: Tensor) -> Tensor:
    """Symmetric square root of a PSD matrix ``[D, D]`` (round-off negative eigenvalues are clipped)."""
    sigma = (sigma + sigma.T) / 2
    vals, vecs = torch.linalg.eigh(sigma)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def _trace_sqrt_product(sqrt1: Tensor, sigma2: Tensor) -> float:
    """``Tr((S1 S2)^(1/2))`` given ``sqrt1 = S1^(1/2)``.

    ``S1 S2`` is similar to the symmetric PSD matrix ``S1^(1/2) S2 S1^(1/2)``, so both have the same
    (real, non-negative) eigenvalues: no complex square root, no imaginary parts to discard.
    """
    m = sqrt1 @ sigma2 @ sqrt1
    vals = torch.linalg.eigvalsh((m + m.T) / 2)
    return float(vals.clamp_min(0).sqrt().sum())


def frechet_from_stats(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (paper Eq. 13).

    ``|mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``; means ``[D]``, covariances ``[D, D]``.
    Clamped at 0 (round-off can leave tiny negatives for identical inputs).
    """
    mu1, mu2 = (torch.as_tensor(m).to("cpu", torch.float64) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s).to("cpu", torch.float64) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(
            f"shape mismatch: mu {tuple(mu1.shape)} / {tuple(mu2.shape)}, "
            f"sigma {tuple(s1.shape)} / {tuple(s2.shape)}"
        )
    return _frechet(mu1, s1, _psd_sqrt(s1), mu2, s2)


def _frechet(mu1: Tensor, s1: Tensor, sqrt1: Tensor, mu2: Tensor, s2: Tensor) -> float:
    diff = float(((mu1 - mu2) ** 2).sum())
    value = diff + float(torch.trace(s1) + torch.trace(s2)) - 2.0 * _trace_sqrt_product(sqrt1, s2)
    return max(value, 0.0)


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between two feature sets ``[Na, D]`` and ``[Nb, D]`` (each with N >= 2)."""
    mu1, s1 = feature_stats(feats_a)
    mu2, s2 = feature_stats(feats_b)
    return frechet_from_stats(mu1, s1, mu2, s2)


# --- precision / recall (Kynkäänniemi et al. 2019) ----------------------------------------------------------


def knn_radii(feats: Tensor, k: int = 3, batch_size: int = 1024) -> Tensor:
    """Distance from each sample to its k-th nearest neighbour in the same set, self excluded: ``[N]``."""
    x = _as_f64(feats, "feats")
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k-NN radii need 1 <= k < N, got k={k}, N={x.shape[0]}")
    radii = []
    for start in range(0, x.shape[0], batch_size):
        d = torch.cdist(x[start : start + batch_size], x)  # [b, N]; column of self is 0, the smallest
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def manifold_coverage(points: Tensor, centres: Tensor, radii: Tensor, batch_size: int = 1024) -> float:
    """Share of ``points [M, D]`` inside some ball ``|p - centres_i| <= radii_i`` (``[N, D]``, ``[N]``)."""
    p, c = _as_f64(points, "points"), _as_f64(centres, "centres")
    inside = 0
    for start in range(0, p.shape[0], batch_size):
        d = torch.cdist(p[start : start + batch_size], c)  # [b, N]
        inside += int((d <= radii.to(torch.float64).unsqueeze(0)).any(dim=1).sum())
    return inside / p.shape[0]


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall of ``fake [M, D]`` against ``real [N, D]`` (Kynkäänniemi et al. 2019).

    Precision: share of fake samples within the k-NN radius of some real sample (fidelity).
    Recall: share of real samples within the k-NN radius of some fake sample (coverage).
    Both sets need more than ``k`` samples.
    """
    precision = manifold_coverage(fake, real, knn_radii(real, k))
    recall = manifold_coverage(real, fake, knn_radii(fake, k))
    return precision, recall


# --- per-class report with the paper's between-class reference (section 3.1) -------------------------------


def reliability(n_real: int, n_fake: int, dim: int, min_pr: int = MIN_PR_SAMPLES) -> list[str]:
    """Why FID / precision / recall on ``n_real`` and ``n_fake`` samples of ``dim``-d features are not
    reliable (see the module docstring); empty when they are."""
    n, counts = min(n_real, n_fake), f"{n_real} real, {n_fake} synthetic"
    problems = []
    if n <= dim:
        problems.append(f"FID on {dim}-d features needs more than {dim} images per set for a full-rank "
                        f"covariance; got {counts}")
    if n < min_pr:
        problems.append(f"precision / recall need at least {min_pr} images per set; got {counts}")
    return problems


@dataclass
class SetStats:
    """What a feature set ``[N, D]`` contributes to FID and precision / recall, computed once: its mean ``[D]``,
    covariance and the covariance's square root ``[D, D]`` (None with fewer than 2 samples) and its k-NN radii
    ``[N]`` (None with ``N <= k``), all float64."""

    feats: Tensor
    mu: Tensor | None
    sigma: Tensor | None
    sqrt: Tensor | None
    radii: Tensor | None


def set_stats(feats: Tensor, k: int = 3) -> SetStats:
    """``SetStats`` of features ``[N, D]`` (any N; the parts a small set cannot have are None)."""
    x = _as_f64(feats, "feats")
    mu, sigma = feature_stats(x) if x.shape[0] >= 2 else (None, None)
    return SetStats(x, mu, sigma, _psd_sqrt(sigma) if sigma is not None else None,
                    knn_radii(x, k) if x.shape[0] > k else None)


def _scores(real: Tensor | SetStats, fake: Tensor, k: int, min_pr: int = MIN_PR_SAMPLES
            ) -> dict[str, float | int | str | bool]:
    """FID + precision/recall of ``fake [M, D]`` vs ``real [N, D]`` (or its ``SetStats``, computed once for
    several synthetic sets: the same numbers, bit for bit) with the counts and ``reliable`` (``reason`` when
    not); NaN with ``<key>_reason`` where a set is too small for the estimate at all."""
    ref = real if isinstance(real, SetStats) else None
    real = ref.feats if ref is not None else real
    n_real, n_fake = int(real.shape[0]), int(fake.shape[0])
    out: dict[str, float | int | str | bool] = {
        "n_real": n_real, "n_fake": n_fake, "fid": math.nan, "precision": math.nan, "recall": math.nan}
    if min(n_real, n_fake) >= 2:
        if ref is not None:
            mu2, s2 = feature_stats(fake)
            out["fid"] = _frechet(ref.mu, ref.sigma, ref.sqrt, mu2, s2)
        else:
            out["fid"] = frechet_distance(real, fake)
    else:
        out["fid_reason"] = f"FID needs at least 2 images per set; got {n_real} real, {n_fake} synthetic"
    if min(n_real, n_fake) > k:
        if ref is not None:
            out["precision"] = manifold_coverage(fake, real, ref.radii)
            out["recall"] = manifold_coverage(real, fake, knn_radii(fake, k))
        else:
            out["precision"], out["recall"] = precision_recall(real, fake, k)
    else:
        for key in ("precision", "recall"):
            out[f"{key}_reason"] = f"needs more than k={k} images per set; got {n_real} real, {n_fake} synthetic"
    problems = reliability(n_real, n_fake, int(real.shape[1]), min_pr)
    out["reliable"] = not problems
    if problems:
        out["reason"] = "; ".join(problems)
    return out


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _between_class(real: Tensor | list[SetStats], labels: Tensor | None, num_classes: int, k: int
                   ) -> list[dict[str, float]]:
    """For each class c: mean / min FID and mean precision, recall of real class c' != c against real class c.

    Class statistics and k-NN radii are computed once per class (or given: ``real`` as the classes'
    ``SetStats``), so the C * (C - 1) pairs stay cheap.
    """
    sets = real if isinstance(real, list) else [set_stats(real[labels == c], k) for c in range(num_classes)]
    out = []
    for c in range(num_classes):
        fids, precs, recs = [], [], []
        for o in range(num_classes):
            if o != c and sets[c].sigma is not None and sets[o].sigma is not None:
                fids.append(_frechet(sets[c].mu, sets[c].sigma, sets[c].sqrt, sets[o].mu, sets[o].sigma))
            if o != c and sets[c].radii is not None and sets[o].radii is not None:
                precs.append(manifold_coverage(sets[o].feats, sets[c].feats, sets[c].radii))
                recs.append(manifold_coverage(sets[c].feats, sets[o].feats, sets[o].radii))
        out.append(
            {
                "fid_mean": _nanmean(fids),
                "fid_min": min(fids) if fids else math.nan,
                "precision_mean": _nanmean(precs),
                "recall_mean": _nanmean(recs),
            }
        )
    return out


@dataclass
class RealReference:
    """The real side of ``distribution_report``, computed once and reused for every synthetic set scored
    against the same real features (``real_reference``): per-class and overall ``SetStats`` and the
    between-class reference."""

    labels: Tensor
    k: int
    per_class: list[SetStats]
    overall: SetStats
    between: list[dict[str, float]]


def real_reference(real_feats: Tensor, real_labels: Tensor, num_classes: int, k: int = 3) -> RealReference:
    """Precompute the real-only parts of ``distribution_report`` for features ``[N, D]`` and labels ``[N]``:
    pass the result as its ``reference`` to score several synthetic sets (the same numbers as without it, bit
    for bit, at a fraction of the cost: the real k-NN radii are the expensive part)."""
    real = _as_f64(real_feats, "real_feats")
    labels = torch.as_tensor(real_labels).long()
    if labels.shape != (real.shape[0],):
        raise ValueError("labels must be [N] and match the feature rows")
    per_class = [set_stats(real[labels == c], k) for c in range(num_classes)]
    return RealReference(labels, k, per_class, set_stats(real, k), _between_class(per_class, None, num_classes, k))


def distribution_report(
    real_feats: Tensor,
    real_labels: Tensor,
    fake_feats: Tensor,
    fake_labels: Tensor,
    class_names: Sequence[str],
    k: int = 3,
    min_pr: int = MIN_PR_SAMPLES,
    reference: RealReference | None = None,
) -> dict:
    """Synthetic vs real per class and overall, with the paper's between-class reference (section 3.1).

    Features ``[N, D]`` / ``[M, D]``, integer labels ``[N]`` / ``[M]`` in ``range(len(class_names))``.
    Returns ``{"k", "feature_dim", "overall", "per_class", "reference"}``:

    - ``overall``: FID, precision, recall of all synthetic vs all real features;
    - ``per_class[name]``: the same within the class, plus ``between_real``: real class c' != c against real
      class c (mean and min FID over c', mean precision / recall);
    - ``reference``: class means of the within-class synthetic scores next to the between-class real ones,
      and whether synthetic data is closer than another real class (``fid_below_between``) and scores
      higher precision / recall (``precision_above_between``, ``recall_above_between``), as the paper reports.

    Entries are NaN where a class has too few samples (FID needs 2, precision/recall more than ``k``), with
    ``<key>_reason``; every ``overall`` / ``per_class`` entry has ``n_real``, ``n_fake`` and ``reliable``
    (``reason`` when false: fewer images than the feature dimension, or than ``min_pr``), and a warning is
    logged when any is unreliable.

    ``reference``: ``real_reference(real_feats, real_labels, len(class_names), k)``, computed once when several
    synthetic sets are scored against the same real features (the same report, bit for bit). Raises
    ``ValueError`` for mismatched shapes, or a reference made with another ``k``, class count or row count.
    """
    real, fake = _as_f64(real_feats, "real_feats"), _as_f64(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: real {real.shape[1]}, fake {fake.shape[1]}")
    real_labels, fake_labels = torch.as_tensor(real_labels).long(), torch.as_tensor(fake_labels).long()
    if real_labels.shape != (real.shape[0],) or fake_labels.shape != (fake.shape[0],):
        raise ValueError("labels must be [N] and match the feature rows")
    num_classes = len(class_names)
    ref = real_reference(real, real_labels, num_classes, k) if reference is None else reference
    if ref.k != k or len(ref.per_class) != num_classes or ref.overall.feats.shape != real.shape:
        raise ValueError(f"the real reference was made with k={ref.k}, {len(ref.per_class)} classes and "
                         f"{tuple(ref.overall.feats.shape)} features; this report has k={k}, {num_classes} "
                         f"classes and {tuple(real.shape)}")
    between = ref.between
    per_class = {}
    for c, name in enumerate(class_names):
        per_class[name] = {
            **_scores(ref.per_class[c], fake[fake_labels == c], k, min_pr),
            "between_real": between[c],
        }
    within = list(per_class.values())
    reference = {
        "within_fid_mean": _nanmean([w["fid"] for w in within]),
        "between_fid_mean": _nanmean([b["fid_mean"] for b in between]),
        "within_precision_mean": _nanmean([w["precision"] for w in within]),
        "between_precision_mean": _nanmean([b["precision_mean"] for b in between]),
        "within_recall_mean": _nanmean([w["recall"] for w in within]),
        "between_recall_mean": _nanmean([b["recall_mean"] for b in between]),
    }
    reference["fid_below_between"] = reference["within_fid_mean"] < reference["between_fid_mean"]
    reference["precision_above_between"] = (
        reference["within_precision_mean"] > reference["between_precision_mean"]
    )
    reference["recall_above_between"] = reference["within_recall_mean"] > reference["between_recall_mean"]
    reference["reliable"] = all(w["reliable"] for w in within)
    overall = _scores(ref.overall, fake, k, min_pr)
    _warn_unreliable(overall, per_class)
    return {
        "k": k,
        "feature_dim": int(real.shape[1]),
        "min_pr_samples": min_pr,
        "overall": overall,
        "per_class": per_class,
        "reference": reference,
    }


def _warn_unreliable(overall: dict, per_class: dict[str, dict]) -> None:
    """One warning for a report with unreliable scores: the overall reason and the classes affected."""
    classes = [name for name, entry in per_class.items() if not entry["reliable"]]
    if overall["reliable"] and not classes:
        return
    where = "overall: " + overall["reason"] if not overall["reliable"] else "overall reliable"
    logger.warning("FID / precision / recall from small samples are flagged \"reliable\": false (%s; %d of %d "
                   "classes unreliable%s)", where, len(classes), len(per_class),
                   f": {classes[:10]}" if classes else "")
