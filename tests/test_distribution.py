"""Fréchet distance and precision / recall against closed forms; feature extractors against manual passes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from longtail.evaluation.distribution import (
    distribution_report,
    feature_stats,
    frechet_distance,
    frechet_from_stats,
    knn_radii,
    precision_recall,
)
from longtail.evaluation.features import (
    FeatureExtractor,
    InceptionFeatures,
    LayerFeatures,
    build_fid_inception,
    extract,
)
from longtail.heads import EpistemicClassifier


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- Fréchet distance ---------------------------------------------------------------------------------------


def test_frechet_of_a_set_with_itself_is_zero():
    x = torch.randn(500, 16, generator=_gen())
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_isotropic_gaussians_is_squared_mean_distance():
    mu = torch.tensor([1.0, -2.0, 0.5])
    eye = torch.eye(3)
    assert frechet_from_stats(torch.zeros(3), eye, mu, eye) == pytest.approx(
        float(mu.pow(2).sum()), rel=1e-12
    )


def test_frechet_diagonal_covariances_trace_formula():
    m1, m2 = torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 0.0, 3.0])
    a, b = torch.tensor([1.0, 4.0, 0.25, 2.0]), torch.tensor([9.0, 1.0, 0.25, 0.5])
    expected = float((m1 - m2).pow(2).sum() + (a + b - 2 * (a * b).sqrt()).sum())
    assert frechet_from_stats(m1, torch.diag(a), m2, torch.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_general_covariances_match_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    ref = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    got = frechet_from_stats(*(torch.from_numpy(v) for v in (m1, s1, m2, s2)))
    assert got == pytest.approx(float(ref), rel=1e-9)


def test_frechet_of_samples_approaches_the_closed_form():
    mu = torch.tensor([1.0, 0.0, -1.0, 0.5])
    a = torch.randn(20_000, 4, generator=_gen(1))
    b = torch.randn(20_000, 4, generator=_gen(2)) + mu
    # sampling error of the mean difference alone is about 2 |mu| sqrt(2 / N) = 0.03
    assert frechet_distance(a, b) == pytest.approx(float(mu.pow(2).sum()), abs=0.1)


def test_frechet_handles_more_dims_than_samples():
    x, y = torch.randn(10, 64, generator=_gen(3)), torch.randn(12, 64, generator=_gen(4))
    value = frechet_distance(x, y)
    assert math.isfinite(value) and value > 0


def test_feature_stats_need_two_samples_and_2d_input():
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        feature_stats(torch.zeros(4))


# --- precision / recall -------------------------------------------------------------------------------------


def test_knn_radii_on_a_line():
    x = torch.arange(10, dtype=torch.float64).unsqueeze(1)  # 0, 1, ..., 9
    assert torch.equal(knn_radii(x, k=1), torch.ones(10, dtype=torch.float64))
    ends_further = torch.tensor(
        [2.0, *[1.0] * 8, 2.0], dtype=torch.float64
    )  # interior: a neighbour each side
    assert torch.equal(knn_radii(x, k=2), ends_further)
    with pytest.raises(ValueError, match="k < N"):
        knn_radii(x, k=10)


def test_precision_recall_identical_sets_is_one_one():
    x = torch.randn(200, 8, generator=_gen(5))
    assert precision_recall(x, x.clone(), k=3) == (1.0, 1.0)


def test_precision_recall_far_apart_sets_is_zero_zero():
    x = torch.randn(200, 8, generator=_gen(6))
    y = torch.randn(150, 8, generator=_gen(7)) + 100.0
    assert precision_recall(x, y, k=3) == (0.0, 0.0)


def test_precision_counts_fake_samples_inside_the_real_manifold():
    real = torch.randn(100, 4, generator=_gen(8))
    fake = torch.cat([real[:50], torch.randn(50, 4, generator=_gen(9)) + 100.0])
    precision, _ = precision_recall(real, fake, k=3)
    assert precision == 0.5


def test_distribution_report_reproduces_the_section_3_1_comparison():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = torch.arange(3).repeat_interleave(200)
    real = centres[labels] + torch.randn(600, 2, generator=_gen(10))
    fake_labels = torch.arange(3).repeat_interleave(100)
    fake = centres[fake_labels] + torch.randn(300, 2, generator=_gen(11))
    rep = distribution_report(real, labels, fake, fake_labels, ["a", "b", "c"], k=3)
    assert set(rep["per_class"]) == {"a", "b", "c"}
    assert rep["per_class"]["a"]["n_real"] == 200 and rep["per_class"]["a"]["n_fake"] == 100
    # a class's real data vs another class: the squared centre distance (100) dominates
    assert rep["per_class"]["a"]["between_real"]["fid_mean"] == pytest.approx(100.0, rel=0.1)
    assert rep["per_class"]["a"]["fid"] < 0.2
    ref = rep["reference"]
    assert ref["fid_below_between"] and ref["precision_above_between"] and ref["recall_above_between"]
    assert rep["overall"]["precision"] > 0.9 and rep["feature_dim"] == 2


def test_distribution_report_marks_too_small_classes_nan():
    real = torch.randn(20, 3, generator=_gen(12))
    labels = torch.tensor([0] * 19 + [1])
    fake, fake_labels = torch.randn(10, 3, generator=_gen(13)), torch.zeros(10, dtype=torch.long)
    rep = distribution_report(real, labels, fake, fake_labels, ["big", "tiny"], k=3)
    assert math.isnan(rep["per_class"]["tiny"]["fid"]) and math.isnan(rep["per_class"]["tiny"]["precision"])
    assert math.isfinite(rep["per_class"]["big"]["fid"])


# --- feature extractors -------------------------------------------------------------------------------------


def test_layer_features_default_is_the_head_input(tiny_cnn):
    x = torch.randn(6, 1, 8, 8, generator=_gen(14))
    tiny_cnn.train()
    feats = LayerFeatures(tiny_cnn)(x)
    tiny_cnn.eval()
    with torch.no_grad():
        expected = tiny_cnn.body(x)
    assert isinstance(LayerFeatures(tiny_cnn), FeatureExtractor)
    assert feats.shape == (6, 8)
    torch.testing.assert_close(feats, expected)
    assert tiny_cnn.fc._forward_pre_hooks == {} and tiny_cnn.training is False  # hook gone; mode restored
    tiny_cnn.train()
    LayerFeatures(tiny_cnn)(x)
    assert tiny_cnn.training is True


def test_layer_features_named_layer_is_pooled(tiny_cnn):
    x = torch.randn(5, 1, 8, 8, generator=_gen(15))
    with torch.no_grad():
        conv = tiny_cnn.body[0](x)
    torch.testing.assert_close(LayerFeatures(tiny_cnn, "body.0")(x), conv.mean(dim=(2, 3)))
    torch.testing.assert_close(LayerFeatures(tiny_cnn, "body.0", pool="flatten")(x), conv.flatten(1))
    with pytest.raises(ValueError, match="no module"):
        LayerFeatures(tiny_cnn, "nope")


def test_layer_features_of_an_epistemic_classifier_use_the_base_head(tiny_cnn):
    clf = EpistemicClassifier(tiny_cnn, num_heads=3)
    x = torch.randn(4, 1, 8, 8, generator=_gen(16))
    tiny_cnn.eval()
    with torch.no_grad():
        expected = tiny_cnn.body(x)
    torch.testing.assert_close(LayerFeatures(clf)(x), expected)


def test_extract_batches_match_one_call(tiny_cnn):
    x = torch.randn(11, 1, 8, 8, generator=_gen(17))
    fx = LayerFeatures(tiny_cnn)
    torch.testing.assert_close(extract(fx, x, batch_size=4), fx(x))


def test_inception_features_never_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"never downloaded"):
        InceptionFeatures(tmp_path / "pt_inception-2015-12-05-6726825d.pth")


def test_inception_features_load_a_local_state_dict(tmp_path):
    torch.manual_seed(0)
    net = build_fid_inception()
    path = tmp_path / "fid_inception.pth"
    torch.save(net.state_dict(), path)
    fx = InceptionFeatures(path)
    feats = fx(torch.rand(2, 1, 32, 32, generator=_gen(18)) * 2 - 1)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    bad = {k: v for k, v in net.state_dict().items() if k != "Mixed_7c.branch_pool.conv.weight"}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an FID Inception"):
        InceptionFeatures(tmp_path / "bad.pth")
