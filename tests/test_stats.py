"""Statistics over seeds: the t quantile, paired differences with their confidence interval, the hard split."""

from __future__ import annotations

import json
import math

import pytest
import torch

from longtail.evaluation.stats import (
    accuracy_on,
    hard_examples,
    paired_difference,
    paired_table,
    regularized_beta,
    t_cdf,
    t_quantile,
)

# two-sided 95% critical values t_{0.975, df} from standard tables (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2)
T_975 = {1: 12.706205, 2: 4.302653, 4: 2.776445, 10: 2.228139, 30: 2.042272}


@pytest.mark.parametrize(("df", "expected"), sorted(T_975.items()))
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-6)
    assert t_cdf(expected, df) == pytest.approx(0.975, abs=1e-7)


@pytest.mark.parametrize("p", [0.01, 0.3, 0.6, 0.9, 0.999])
def test_t_quantile_closed_forms(p):
    # df = 1 is Cauchy: tan(pi (p - 1/2)); df = 2: (2p - 1) / sqrt(2 p (1 - p))
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert t_quantile(0.5, 7) == 0.0


def test_t_quantile_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (0.5, 1, 3, 3.7, 9, 50, 1000):
        for p in (0.001, 0.2, 0.75, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-8, abs=1e-10)


def test_regularized_beta_known_values():
    for x in (0.0, 0.1, 0.37, 0.9, 1.0):
        assert regularized_beta(1, 1, x) == pytest.approx(x, abs=1e-14)  # uniform
        assert regularized_beta(3, 1, x) == pytest.approx(x**3, abs=1e-14)  # I_x(a, 1) = x^a
        assert regularized_beta(1, 2, x) == pytest.approx(1 - (1 - x) ** 2, abs=1e-14)
    assert regularized_beta(4.5, 4.5, 0.5) == pytest.approx(0.5, abs=1e-14)  # symmetric


def test_t_quantile_rejects_bad_arguments():
    for p in (0.0, 1.0, -0.1, math.nan):
        with pytest.raises(ValueError):
            t_quantile(p, 3)
    for df in (0, -1, math.inf):
        with pytest.raises(ValueError):
            t_quantile(0.9, df)


def test_paired_difference_three_seeds():
    a = {0: 3.0, 1: 4.0, 2: 5.0}
    b = {0: 2.0, 1: 2.0, 2: 2.0}  # differences 1, 2, 3: mean 2, sd 1
    out = paired_difference(a, b)
    half = 4.302653 / math.sqrt(3)
    assert out["n"] == 3 and out["mean"] == pytest.approx(2.0) and out["sd"] == pytest.approx(1.0)
    assert out["ci"] == pytest.approx([2 - half, 2 + half], abs=1e-4)
    assert out["differences"] == {0: 1.0, 1: 2.0, 2: 3.0}
    assert (out["wins"], out["losses"], out["ties"]) == (3, 0, 0)
    assert out["level"] == 0.95


def test_paired_difference_five_seeds_wins_losses_ties():
    b = {s: 0.5 for s in range(5)}
    d = [0.2, -0.1, 0.0, 0.4, 0.5]  # mean 0.2, sum of squares 0.26, sd sqrt(0.065)
    a = {s: 0.5 + x for s, x in enumerate(d)}
    out = paired_difference(a, b)
    sd = math.sqrt(0.26 / 4)
    half = 2.776445 * sd / math.sqrt(5)
    assert out["mean"] == pytest.approx(0.2) and out["sd"] == pytest.approx(sd)
    assert out["ci"] == pytest.approx([0.2 - half, 0.2 + half], abs=1e-4)
    assert (out["wins"], out["losses"], out["ties"]) == (3, 1, 1)
    # 90%: t_{0.95, 4} = 2.131847
    narrow = paired_difference(a, b, level=0.90)["ci"]
    assert narrow == pytest.approx([0.2 - 2.131847 * sd / math.sqrt(5), 0.2 + 2.131847 * sd / math.sqrt(5)])


def test_paired_difference_leaves_out_unpaired_and_nonfinite_seeds():
    a = {0: 0.6, 1: 0.7, 2: 0.9, 3: math.nan, 5: 0.1}
    b = {0: 0.5, 1: 0.8, 2: 0.9, 3: 0.4, 4: 0.3, 5: None}
    out = paired_difference(a, b)
    assert out["n"] == 3 and set(out["differences"]) == {0, 1, 2}
    assert out["differences"][0] == pytest.approx(0.1) and out["differences"][1] == pytest.approx(-0.1)
    assert (out["wins"], out["losses"], out["ties"]) == (1, 1, 1)
    assert out["mean"] == pytest.approx(0.0, abs=1e-12)


def test_paired_difference_one_or_no_seed():
    one = paired_difference({7: 0.8, 8: 0.3}, {7: 0.5})
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.3) and one["ci"] is None
    assert one["sd"] == 0.0 and (one["wins"], one["losses"], one["ties"]) == (1, 0, 0)
    none = paired_difference({0: 0.8}, {1: 0.5})
    assert none["n"] == 0 and none["mean"] is None and none["ci"] is None and none["differences"] == {}


def test_paired_table():
    finals = {
        0: {"none": {"few": 0.1, "top1": 0.5}, "unguided": {"few": 0.2, "top1": 0.6}, "ltg": {"few": 0.4}},
        1: {"unguided": {"few": 0.3, "top1": 0.6}, "ltg": {"few": 0.4, "top1": 0.7}},
        2: {"ltg": {"few": 0.9, "top1": 0.9}},  # no baseline: left out of every pair
    }
    table = paired_table(finals, metrics=("few", "top1"))
    assert list(table) == ["none", "ltg"]
    assert set(table["ltg"]) == {"few", "top1"}
    few = table["ltg"]["few"]
    assert few["differences"] == pytest.approx({0: 0.2, 1: 0.1}) and few["n"] == 2
    assert table["ltg"]["top1"]["differences"] == pytest.approx({1: 0.1})  # seed 0's ltg has no top1
    assert table["ltg"]["top1"]["ci"] is None
    assert table["none"]["top1"]["mean"] == pytest.approx(-0.1) and table["none"]["few"]["losses"] == 1
    json.dumps(table)  # what metrics.json stores
    assert paired_table(finals, baseline="gif") == {}
    assert list(paired_table(finals, baseline="ltg")) == ["none", "unguided"]


def test_hard_examples_on_a_hand_made_matrix():
    correct = {
        0: torch.tensor([True, False, False, True, False, True]),
        1: torch.tensor([True, False, True, False, False, True]),
        2: torch.tensor([True, False, True, True, True, False]),
        3: torch.tensor([True, False, False, False, True, True]),
    }
    # wrong counts over 4 seeds:       0     4      2      2      2      1
    assert hard_examples(correct).tolist() == [False, True, True, True, True, False]
    assert hard_examples(correct, min_wrong=0.75).tolist() == [False, True, False, False, False, False]
    assert hard_examples(correct, min_wrong=0.25).tolist() == [False, True, True, True, True, True]
    three = {s: correct[s] for s in (0, 1, 2)}  # wrong counts 0 3 1 1 2 1; 2 of 3 is exactly 2/3
    assert hard_examples(three, min_wrong=2 / 3).tolist() == [False, True, False, False, True, False]


def test_hard_examples_rejects_bad_input():
    with pytest.raises(ValueError, match="same test set"):
        hard_examples({0: torch.ones(3, dtype=torch.bool), 1: torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError):
        hard_examples({})
    with pytest.raises(ValueError):
        hard_examples({0: torch.ones(3, dtype=torch.bool)}, min_wrong=0.0)


def test_accuracy_on():
    mask = torch.tensor([True, True, False, True])
    correct = torch.tensor([True, False, True, True])
    assert accuracy_on(mask, correct) == pytest.approx(2 / 3)
    assert accuracy_on(torch.ones(4, dtype=torch.bool), correct) == pytest.approx(0.75)
    assert math.isnan(accuracy_on(torch.zeros(4, dtype=torch.bool), correct))
    with pytest.raises(ValueError):
        accuracy_on(mask[:3], correct)
