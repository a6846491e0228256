import pytest

from longtail.conditions import check_condition, condition_label, mean_std_cell


def test_cell_shows_spread_only_over_several_seeds():
    assert mean_std_cell({"mean": 0.8193, "std": 0.0, "n": 1}, width=8) == "   0.819"
    assert mean_std_cell({"mean": 0.5, "std": 0.0123, "n": 3}, width=0, digits=2) == "0.50 ± 0.01"


def test_condition_names_and_labels():
    check_condition("ltg:entropy@2")
    assert condition_label("ltg:entropy@2", {"signal": "entropy", "weight": 2.0}) == "+ LTG (entropy, w=2)"
    with pytest.raises(ValueError, match="nonsense"):
        check_condition("nonsense")
