import math

import pytest
import torch

from longtail.evaluation.metrics import accuracy_report, auroc, dense_rank, detection_report
from longtail.outputs import ClassifierOutput


@pytest.mark.parametrize("offset", [0.0, 20.0, -1e3])
def test_auroc_of_perfect_reversed_and_tied_scores(offset):
    targets = torch.tensor([0, 0, 1, 1])
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0]) + offset  # large values too: no sigmoid saturation
    assert auroc(scores, targets) == 1.0
    assert auroc(-scores, targets) == 0.0
    assert auroc(torch.full((4,), offset), targets) == 0.5
    assert math.isnan(auroc(scores, torch.zeros(4)))


def test_dense_rank_keeps_order_and_ties():
    assert dense_rank(torch.tensor([5.0, 1.0, 5.0, 3.0])).tolist() == [1.0, 0.0, 1.0, 0.5]


def test_accuracy_groups_and_detection_report():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 0, 1, 0, 0, 0])
    rep = accuracy_report(preds, labels, ["many", "medium", "few"])
    assert rep["top1"] == pytest.approx(3 / 6) and rep["many"] == 1.0 and rep["medium"] == 0.5 and rep["few"] == 0.0
    # logits whose entropy is highest exactly on the wrong / rare examples: AUROC 1 for hard
    logits = torch.tensor([[9.0, 0, 0], [9, 0, 0], [0, 9, 0], [1, 0.9, 0], [1, 0.9, 0], [1, 0.9, 0]])
    det = detection_report(ClassifierOutput(logits), labels, ["many", "medium", "few"], names=["entropy"])
    assert det["entropy"]["auroc_hard"] == 1.0 and det["entropy"]["auroc_rare"] > 0.5
