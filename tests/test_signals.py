import math

import pytest
import torch

from longtail import signals as S


def one_hot_logits(classes, num_classes, scale=1e4):
    logits = torch.full((len(classes), num_classes), -scale)
    logits[torch.arange(len(classes)), torch.tensor(classes)] = scale
    return logits


def test_disagreeing_one_hot_heads_give_log_k():
    K, C = 5, 10
    heads = one_hot_logits(list(range(K)), C).unsqueeze(0)  # [1, K, C], each head sure of a different class
    assert S.epistemic(heads).item() == pytest.approx(math.log(K), abs=1e-5)
    assert S.aleatoric(heads).item() == pytest.approx(0.0, abs=1e-6)
    assert S.total(heads).item() == pytest.approx(math.log(K), abs=1e-5)


def test_identical_uniform_heads_give_zero_epistemic_and_log_c_aleatoric():
    K, C = 4, 7
    heads = torch.zeros(3, K, C)
    assert torch.allclose(S.epistemic(heads), torch.zeros(3), atol=1e-6)
    assert torch.allclose(S.aleatoric(heads), torch.full((3,), math.log(C)), atol=1e-5)
    assert torch.allclose(S.total(heads), torch.full((3,), math.log(C)), atol=1e-5)


def test_entropy_and_energy_on_hand_computed_logits():
    logits = torch.tensor([[math.log(1.0), math.log(3.0)]])  # p = (1/4, 3/4)
    expected_h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert S.entropy(logits).item() == pytest.approx(expected_h, rel=1e-6)
    # energy: -log(1 + 3) = -log 4; with T = 2: -2 log(exp(0) + exp(log3 / 2)) = -2 log(1 + sqrt 3)
    assert S.energy(logits).item() == pytest.approx(-math.log(4.0), rel=1e-6)
    assert S.energy(logits, temperature=2.0).item() == pytest.approx(-2 * math.log(1 + math.sqrt(3)), rel=1e-6)


def test_higher_means_more_longtail():
    confident = torch.tensor([[10.0, 0.0, 0.0]])
    unsure = torch.tensor([[0.1, 0.0, 0.0]])
    for name in ("entropy", "energy"):
        fn = S.get_signal(name)
        assert fn(unsure) > fn(confident), name
    agree = torch.tensor([[[5.0, 0.0], [5.0, 0.0]]])
    disagree = torch.tensor([[[5.0, 0.0], [0.0, 5.0]]])
    assert S.epistemic(disagree) > S.epistemic(agree)


@pytest.mark.parametrize("name", sorted(S.SIGNALS))
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_gradients_finite_at_one_hot_and_huge_logits(name, scale):
    heads = one_hot_logits([0, 1, 2], 4, scale).unsqueeze(0).repeat(2, 1, 1)  # [2, 3, 4]
    heads = heads.clone().requires_grad_(True)
    logits = heads[:, 0].detach().clone().requires_grad_(True)
    sig = S.get_signal(name)
    value = sig(logits, heads)
    assert value.shape == (2,)
    assert torch.isfinite(value).all()
    value.sum().backward()
    for t in (heads.grad, logits.grad):
        if t is not None:
            assert torch.isfinite(t).all()


def test_two_dim_input_is_one_head():
    logits = torch.randn(6, 5)
    assert torch.allclose(S.total(logits), S.entropy(logits))
    assert torch.allclose(S.aleatoric(logits), S.entropy(logits), atol=1e-6)
    with pytest.raises(ValueError, match="K >= 2"):
        S.epistemic(logits)


def test_signal_needing_heads_without_heads_is_a_clear_error():
    with pytest.raises(ValueError, match="Epistemic Head"):
        S.get_signal("epistemic")(torch.randn(2, 3), None)


def test_registry_rejects_unknown_names_and_bad_shapes():
    with pytest.raises(ValueError, match="unknown signal 'entropyy'"):
        S.get_signal("entropyy")
    with pytest.raises(ValueError, match=r"\[B, C\] or \[B, K, C\]"):
        S.entropy(torch.randn(3))
    with pytest.raises(ValueError, match="temperature"):
        S.energy(torch.randn(2, 3), temperature=0)


def test_variance_forms_match_the_law_of_total_variance():
    means = torch.tensor([[[1.0], [3.0]]])  # two heads: mean 1 and 3 -> Var = 1
    variances = torch.tensor([[[0.5], [1.5]]])  # mean variance 1
    assert S.variance_epistemic(means, variances).item() == pytest.approx(1.0)
    assert S.variance_aleatoric(means, variances).item() == pytest.approx(1.0)
    assert S.variance_total(means, variances).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"\[B, K, D\]"):
        S.variance_total(means, variances[..., :0])
