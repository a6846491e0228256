"""The demo's speed-ups keep its numbers: the real side of the distance report computed once per seed gives the
same report bit for bit, the base stage's evaluation reused as mining's round 0 is the evaluation itself."""

from __future__ import annotations

import math

import pytest
import torch

from longtail.evaluation.distribution import (
    distribution_report,
    frechet_distance,
    precision_recall,
    real_reference,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sets():
    """Three real classes (one of 3 images: too few for k-NN radii, enough for FID), two synthetic sets."""
    labels = torch.tensor([0] * 60 + [1] * 50 + [2] * 3)
    real = torch.randn(len(labels), 4, generator=_gen(0)) + labels[:, None].float() * 3
    fakes = []
    for seed in (1, 2):
        fake_labels = torch.tensor([0] * 30 + [1] * 20 + [2] * 5)
        fakes.append((torch.randn(len(fake_labels), 4, generator=_gen(seed)) + fake_labels[:, None].float() * 3,
                       fake_labels))
    return real, labels, fakes


def _same(a, b) -> bool:
    """Equal JSON-like trees, NaN equal to NaN, floats compared exactly."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def test_a_shared_real_reference_gives_the_same_reports_bit_for_bit():
    real, labels, fakes = _sets()
    names = ["a", "b", "c"]
    reference = real_reference(real, labels, len(names), k=3)
    for fake, fake_labels in fakes:
        alone = distribution_report(real, labels, fake, fake_labels, names, k=3)
        shared = distribution_report(real, labels, fake, fake_labels, names, k=3, reference=reference)
        assert _same(alone, shared)
        # and the numbers are the direct formulas' (frechet_distance, precision_recall), exactly
        for c, name in enumerate(names[:2]):
            r, f = real[labels == c].double(), fake[fake_labels == c].double()
            assert shared["per_class"][name]["fid"] == frechet_distance(r, f)
            assert (shared["per_class"][name]["precision"], shared["per_class"][name]["recall"]) == \
                precision_recall(r, f, 3)
        assert shared["overall"]["fid"] == frechet_distance(real.double(), fake.double())
        assert shared["per_class"]["a"]["between_real"]["fid_min"] == min(
            frechet_distance(real[labels == 0].double(), real[labels == o].double()) for o in (1, 2))
        assert math.isnan(shared["per_class"]["c"]["precision"]) and math.isfinite(shared["per_class"]["c"]["fid"])


def test_a_reference_from_other_real_features_is_refused():
    real, labels, fakes = _sets()
    fake, fake_labels = fakes[0]
    with pytest.raises(ValueError, match="k=3"):
        distribution_report(real, labels, fake, fake_labels, ["a", "b", "c"], k=5,
                            reference=real_reference(real, labels, 3, k=3))
    with pytest.raises(ValueError, match="features"):
        distribution_report(real[:-1], labels[:-1], fake, fake_labels, ["a", "b", "c"], k=3,
                            reference=real_reference(real, labels, 3, k=3))


class _Source:
    """The few parts of a data source that ``evaluate`` reads: 60 evaluation images of 3 classes."""

    def __init__(self) -> None:
        self.x = torch.rand(60, 1, 16, 16, generator=_gen(3)) * 2 - 1
        self.y = torch.arange(3).repeat(20)
        self.groups = ["many", "medium", "few"]

    def eval_loader(self):
        from torch.utils.data import DataLoader, TensorDataset

        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)

    def extra_eval_loaders(self):
        return {}


def test_round_0_from_the_base_stage_predictions_is_the_evaluation_of_the_reloaded_classifier(tmp_path):
    """Mining's round 0 takes the base stage's predictions instead of evaluating the classifier reloaded from
    its checkpoint again: the same numbers, because the reloaded classifier predicts bit for bit the same."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from longtail.jobs.stages import evaluate
    from longtail.mining import load_state, save_state
    from longtail.train import make_classifier, predict_loader

    model = make_classifier(num_classes=3, width=4, num_heads=2, seed=0)
    for m in model.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=_gen(4))
            m.running_var.uniform_(0.5, 2.0, generator=_gen(5))
    ctx = SimpleNamespace(source=_Source(), acc=Accelerator(cpu=True), hard=None, is_main=True)
    kept = predict_loader(model.eval(), ctx.source.eval_loader(), ctx.acc)
    save_state(model, tmp_path / "base.safetensors")
    reloaded = make_classifier(num_classes=3, width=4, num_heads=2, seed=1)  # other weights until loaded
    load_state(reloaded, tmp_path / "base.safetensors")
    fresh = evaluate(ctx, reloaded, splits=False)
    reused = evaluate(ctx, reloaded, splits=False, predictions=kept)
    assert _same(fresh, reused) and "detection" in reused
    other = make_classifier(num_classes=3, width=4, num_heads=2, seed=1)
    assert not torch.equal(predict_loader(other, ctx.source.eval_loader(), ctx.acc)[0].logits, kept[0].logits)
