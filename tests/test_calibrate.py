import pytest

from longtail.calibrate import SweepPoint, choose_weight


def pt(w, s, p):
    return SweepPoint("total", w, s, p, accuracy=p, n=10, seconds=1.0)


def test_rule_picks_the_most_longtail_weight_that_stays_in_distribution():
    points = [pt(0.0, 0.5, 0.9), pt(0.3, 0.6, 0.85), pt(1.0, 0.9, 0.6), pt(3.0, 1.4, 0.3)]
    choice = choose_weight(points, "total", min_p_ratio=0.5)
    assert choice.weight == 1.0  # w=3 has the highest signal but P(class) fell below half of unguided
    assert choice.baseline_p_class == 0.9
    assert choose_weight(points, "total", min_p_ratio=0.3).weight == 3.0


def test_no_weight_passes_when_signal_does_not_rise_or_p_class_does_not_drop():
    points = [pt(0.0, 0.5, 0.9), pt(1.0, 0.4, 0.8), pt(2.0, 0.7, 0.95)]
    choice = choose_weight(points, "total")
    assert choice.weight is None and "no weight" in choice.reason


def test_needs_the_unguided_point():
    with pytest.raises(ValueError, match="w = 0"):
        choose_weight([pt(1.0, 0.5, 0.5)], "total")
