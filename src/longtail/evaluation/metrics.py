"""Accuracy by Many / Medium / Few and how well each longtail signal detects rare or hard examples.

Groups follow ``longtail.data.datasets.class_groups`` (Many > 100 train images, Few < 20, Medium between,
inclusive). Detection is AUROC (torchmetrics) of a signal as a score for "rare" (the example's class is Few)
or "hard" (the classifier gets it wrong), as in the paper's Figure 5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc

from ..outputs import ClassifierOutput
from ..signals import SIGNALS, get_signal

GROUPS = ("many", "medium", "few")


def accuracy_report(preds: Tensor, labels: Tensor, groups: Sequence[str]) -> dict[str, float | list[float]]:
    """Top-1, per-class and Many/Medium/Few accuracy (group accuracy = mean over its classes' examples)."""
    correct = (preds == labels).float()
    num_classes = len(groups)
    per_class = [float(correct[labels == c].mean()) if (labels == c).any() else float("nan") for c in range(num_classes)]
    report: dict[str, float | list[float]] = {"top1": float(correct.mean()), "per_class": per_class}
    for g in GROUPS:
        mask = torch.tensor([groups[int(y)] == g for y in labels])
        report[g] = float(correct[mask].mean()) if mask.any() else float("nan")
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
    if targets.min() == targets.max():
        return float("nan")
    return float(binary_auroc(dense_rank(scores), targets))


def detection_report(
    out: ClassifierOutput, labels: Tensor, groups: Sequence[str], names: Sequence[str] | None = None
) -> dict[str, dict[str, float]]:
    """AUROC of each signal for detecting rare (Few-class) and hard (misclassified) examples.

    Also the paper's Figure 11 view: accuracy of the examples above vs below the signal's 90% quantile.
    """
    preds = out.logits.argmax(dim=-1)
    rare = torch.tensor([groups[int(y)] == "few" for y in labels])
    hard = preds != labels
    correct = (~hard).float()
    report: dict[str, dict[str, float]] = {}
    for name, score in signal_scores(out, names).items():
        q90 = torch.quantile(score, 0.9)
        top = score >= q90
        report[name] = {
            "auroc_rare": auroc(score, rare),
            "auroc_hard": auroc(score, hard),
            "acc_above_q90": float(correct[top].mean()),
            "acc_below_q90": float(correct[~top].mean()),
        }
    return report
