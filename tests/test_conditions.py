import math

import pytest

from longtail.conditions import Condition, ConditionError, condition_label, parse_conditions
from longtail.evaluation.stats import mean_std, mean_std_cell
from longtail.files import read_json, write_json
from longtail.sampling import GuidanceConfig


def test_cell_shows_spread_only_over_several_seeds():
    assert mean_std_cell({"mean": 0.8193, "std": 0.0, "n": 1}, width=8) == "   0.819"
    assert mean_std_cell({"mean": 0.5, "std": 0.0123, "n": 3}, width=0, digits=2) == "0.50 ± 0.01"
    assert mean_std_cell({"mean": None, "std": None, "n": 0}, width=3) == "  -"


def test_mean_std_is_the_sample_std_over_finite_values():
    stat = mean_std([1.0, 2.0, 4.0, float("nan"), None])
    assert stat["n"] == 3 and stat["mean"] == pytest.approx(7 / 3)
    assert stat["std"] == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}
    assert mean_std([float("nan")]) == {"mean": None, "std": None, "n": 0}


def test_json_is_strict_and_atomic(tmp_path):
    path = write_json(tmp_path / "a" / "m.json", {"auroc": float("nan"), "x": [1.0, float("inf")]})
    assert "NaN" not in path.read_text() and read_json(path) == {"auroc": None, "x": [1.0, None]}
    assert read_json(tmp_path / "absent.json") is None
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]


def test_condition_grammar():
    assert Condition.parse("ltg") == Condition("ltg", "ltg")
    assert Condition.parse("ltg:entropy@2") == Condition("ltg:entropy@2", "ltg", signal="entropy", weight=2.0)
    assert Condition.parse("ltg@3").weight == 3.0 and Condition.parse("ltg@3").signal is None
    assert Condition.parse("naive:total").kind == "naive"
    assert Condition.parse("aug:cutmix").augment == "cutmix"
    assert Condition.parse("ltg:total@0.3").dirname == "ltg_total_w0.3"
    assert [c.synthetic for c in parse_conditions(["none", "unguided", "aug:cutout", "gif"])] == [
        False, True, False, True]
    for bad, match in [("nonsense", "nonsense"), ("ltg:bogus", "bogus"), ("ltg:total@x", "'x' is not a number"),
                       ("aug:nope", "nope"), ("none:x", "none:x")]:
        with pytest.raises(ConditionError, match=match):
            Condition.parse(bad)
    assert Condition.parse("bestof").factor == 4 and Condition.parse("bestof:entropy@8").factor == 8
    assert Condition.parse("bestof@2").guidance(GuidanceConfig(), float) is None
    assert Condition.parse("bestof:entropy@8").label() == "+ best-of-8 (entropy)"
    for bad in ("bestof@1", "bestof@2.5"):
        with pytest.raises(ConditionError, match="N"):
            Condition.parse(bad)
    judged = Condition.parse("ltg:total@1+judge")
    assert judged.judge_filter and judged.kind == "ltg" and judged.weight == 1.0 and judged.dirname == "ltg_total_w1_judge"
    assert judged.label({"signal": "total", "weight": 1.0}) == "+ LTG (total, w=1) + judge filter"
    for bad in ("none+judge", "aug:cutout+judge", "bestof@2+judge"):
        with pytest.raises(ConditionError, match=r"\+judge"):
            Condition.parse(bad)
    with pytest.raises(ConditionError, match="twice"):
        parse_conditions(["ltg", "ltg"])


def test_condition_guidance_and_labels():
    base = GuidanceConfig("total", weight=0.0, end=0.5)
    weights = {"total": 3.0, "entropy": 1.0}.__getitem__
    assert Condition.parse("unguided").guidance(base, weights) is None
    g = Condition.parse("ltg").guidance(base, weights)
    assert (g.signal, g.weight, g.end, g.on_noisy) == ("total", 3.0, 0.5, False)
    g = Condition.parse("ltg:entropy").guidance(base, weights)
    assert (g.signal, g.weight) == ("entropy", 1.0)
    g = Condition.parse("naive@7").guidance(base, weights)
    assert (g.signal, g.weight, g.on_noisy) == ("total", 7.0, True)
    assert condition_label("ltg:entropy@2", {"signal": "entropy", "weight": 2.0}) == "+ LTG (entropy, w=2)"
    assert condition_label("aug:cutout") == "+ aug cutout"
    assert condition_label("none") == "+ fine-tune, no synth"
