"""Accuracy by Many / Medium / Few and how well each longtail signal detects rare or hard examples.

Groups follow ``longtail.data.datasets.class_groups`` (Many > 100 train images, Few < 20, Medium between,
inclusive). Detection is AUROC (torchmetrics) of a signal as a score for "rare" (the example's class is Few)
or "hard" (the classifier gets it wrong), as in the paper's Figure 5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc

from ..outputs import ClassifierOutput
from ..signals import SIGNALS, get_signal

GROUPS = ("many", "medium", "few")


def accuracy_report(preds: Tensor, labels: Tensor, groups: Sequence[str]) -> dict[str, float | list[float] | str]:
    """Top-1, per-class and Many/Medium/Few accuracy (group accuracy = mean over its classes' examples).

    ``preds``, ``labels`` ``[N]``; ``groups`` one name per class. An accuracy with no examples behind it is NaN
    (written as ``null``), never 0, with the reason beside it: ``per_class_reason``, ``<group>_reason``.
    """
    correct = (preds == labels).float()
    num_classes = len(groups)
    per_class = [float(correct[labels == c].mean()) if (labels == c).any() else float("nan") for c in range(num_classes)]
    report: dict[str, float | list[float] | str] = {"top1": float(correct.mean()), "per_class": per_class}
    absent = [c for c, v in enumerate(per_class) if math.isnan(v)]
    if absent:
        report["per_class_reason"] = f"no test examples of classes {absent}"
    for g in GROUPS:
        mask = torch.tensor([groups[int(y)] == g for y in labels], dtype=torch.bool)
        report[g] = float(correct[mask].mean()) if mask.any() else float("nan")
        if not mask.any():
            report[f"{g}_reason"] = f"no test examples of a {g} class"
    return report


def signal_scores(out: ClassifierOutput, names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Every applicable signal ``[N]`` for a batch of classifier outputs (head signals only with heads)."""
    names = names or [n for n, s in SIGNALS.items() if out.head_logits is not None or not s.needs_heads]
    return {n: get_signal(n)(out.logits, out.head_logits).float() for n in names}


def dense_rank(score: Tensor) -> Tensor:
    """Scores ``[N]`` -> dense ranks scaled to [0, 1]: same order and ties, hence the same ROC curve.

    torchmetrics squashes scores outside [0, 1] with a sigmoid, which in float32 ties every score above ~17;
    ranks keep any signal's ordering intact.
    """
    _, inverse = torch.unique(score.double(), return_inverse=True)
    return inverse.float() / max(int(inverse.max()), 1)


def auroc(scores: Tensor, targets: Tensor) -> float:
    """Area under the ROC curve of ``scores [N]`` for binary ``targets [N]`` (NaN if one class is absent)."""
    targets = targets.long()
    if targets.numel() == 0 or targets.min() == targets.max():
        return float("nan")
    return float(binary_auroc(dense_rank(scores), targets))


def one_class_reason(targets: Tensor, what: str) -> str | None:
    """Why an AUROC of binary ``targets [N]`` is undefined (None when both classes are present)."""
    n, positives = targets.numel(), int(targets.long().sum())
    if n == 0:
        return "no examples"
    if positives == n:
        return f"only one class present: all {n} examples are {what}"
    if positives == 0:
        return f"only one class present: none of the {n} examples is {what}"
    return None


def _q90_split(score: Tensor, correct: Tensor) -> dict[str, float | str]:
    """Accuracy of the examples at or above the signal's 90% quantile and below it (Figure 11)."""
    top = score >= torch.quantile(score, 0.9)
    out: dict[str, float | str] = {"acc_above_q90": float(correct[top].mean()),
                                   "acc_below_q90": float(correct[~top].mean())}
    if not (~top).any():
        out["acc_below_q90_reason"] = "no example below the signal's 90% quantile (tied scores)"
    return out


def detection_report(
    out: ClassifierOutput, labels: Tensor, groups: Sequence[str], names: Sequence[str] | None = None
) -> dict[str, dict[str, float | str]]:
    """AUROC of each signal for detecting rare (Few-class) and hard (misclassified) examples.

    Also the paper's Figure 11 view: accuracy of the examples above vs below the signal's 90% quantile.
    An undefined figure is NaN (written as ``null``) with ``<key>_reason`` beside it, e.g. ``auroc_rare``
    when no test class is Few: ``"only one class present: none of the N examples is rare"``.
    """
    preds = out.logits.argmax(dim=-1)
    rare = torch.tensor([groups[int(y)] == "few" for y in labels], dtype=torch.bool)
    hard = preds != labels
    correct = (~hard).float()
    targets = {"auroc_rare": (rare, one_class_reason(rare, "rare")),
               "auroc_hard": (hard, one_class_reason(hard, "misclassified"))}
    report: dict[str, dict[str, float | str]] = {}
    for name, score in signal_scores(out, names).items():
        entry: dict[str, float | str] = {}
        for key, (target, reason) in targets.items():
            entry[key] = auroc(score, target)
            if reason is not None:
                entry[f"{key}_reason"] = reason
        report[name] = {**entry, **_q90_split(score, correct)}
    return report
