
import pytest
import torch

from helpers import Brightness
from longtail.calibrate import SweepPoint, calibrate, choose_weight, sweep
from longtail.evaluation.judge import Judge
from longtail.generate import Generated, Job
from longtail.outputs import ClassifierOutput
from longtail.sampling import GuidanceConfig


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


# --- the rule with a judge ----------------------------------------------------------------------------------


def jpt(w, s, p, judge_acc):
    return SweepPoint("total", w, s, p, accuracy=p, n=10, seconds=1.0, judge_accuracy=judge_acc,
                      judge_p_class=judge_acc)


def test_the_judge_refuses_a_weight_that_breaks_the_images():
    # w=1 passes the paper's rule (signal up, P(class) 0.6 >= 0.5 x 0.9), but the judge's accuracy collapsed
    points = [jpt(0.0, 0.5, 0.9, 0.9), jpt(0.3, 0.6, 0.85, 0.8), jpt(1.0, 0.9, 0.6, 0.2)]
    assert choose_weight(points, "total", min_p_ratio=0.5).weight == 1.0
    assert choose_weight(points, "total", 0.5, min_judge_ratio=None).weight == 1.0  # None: the paper's rule
    choice = choose_weight(points, "total", min_p_ratio=0.5, min_judge_ratio=0.5)
    assert choice.weight == 0.3 and choice.baseline_judge_accuracy == 0.9
    assert "judge accuracy 0.900 -> 0.800" in choice.reason
    refused = choose_weight(points, "total", min_p_ratio=0.5, min_judge_ratio=0.95)  # floor 0.855: none passes
    assert refused.weight is None and "judge accuracy >= 0.95 x unguided" in refused.reason


def test_the_judge_ratio_needs_judge_columns():
    with pytest.raises(ValueError, match="sweep with a judge"):
        choose_weight([pt(0.0, 0.5, 0.9), pt(1.0, 0.9, 0.6)], "total", min_judge_ratio=0.5)


# --- sweep / calibrate with a judge, on hand-made generations -----------------------------------------------



LABELS = torch.tensor([0, 0, 1, 1])
# the guided classifier's logit for the intended class (others 0) and the images' brightness, per weight:
# w=2 fools the guided classifier most (highest entropy, P(class) still >= half) but flips the images
LOGIT = {0.0: 3.0, 1.0: 1.0, 2.0: 0.5}
BRIGHT = {0.0: 0.5, 1.0: 0.5, 2.0: -3.0}  # class-1 images at +b, class-0 images at -b


def fake_generate(guidance: GuidanceConfig | None) -> Generated:
    w = guidance.weight if guidance else 0.0
    logits = torch.zeros(4, 2)
    logits[torch.arange(4), LABELS] = LOGIT[w]
    sign = LABELS.float() * 2 - 1
    images = (sign * BRIGHT[w]).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).clone()
    jobs = [Job(int(c), i, i, "") for i, c in enumerate(LABELS)]
    return Generated(images=images, jobs=jobs, labels=LABELS.clone(), signal=None,
                     p_class=logits.softmax(-1)[torch.arange(4), LABELS], pred=logits.argmax(-1),
                     output=ClassifierOutput(logits=logits), signal_name=None, seconds=1.0)


def real_reference() -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.tensor([-0.1, -0.05, 0.05, 0.1])
    values = torch.cat([-0.5 + offsets, 0.5 + offsets])
    return values.view(-1, 1, 1, 1).expand(-1, 1, 4, 4).clone(), torch.tensor([0] * 4 + [1] * 4)


def test_sweep_records_the_judge_and_the_rule_uses_it(tmp_path):
    judge = Judge(Brightness(), ["dark", "bright"])
    real, real_labels = real_reference()
    lines: list[str] = []
    result = calibrate(fake_generate, LABELS, ["entropy"], [1.0, 2.0], tmp_path, min_p_ratio=0.5,
                       per_class_in_grid=1, log=lines.append, judge=judge, real_images=real,
                       real_labels=real_labels, min_judge_ratio=0.5, class_names=["Dark", "bright"])
    by_w = {p["weight"]: p for p in result["points"]}
    assert by_w[0.0]["judge_accuracy"] == 1.0 and by_w[0.0]["judge_p_class"] == pytest.approx(0.75)
    assert by_w[1.0]["judge_precision"] == 1.0  # the unflipped images lie inside the real manifold
    assert by_w[2.0]["judge_accuracy"] == 0.0 and by_w[2.0]["judge_p_class"] == pytest.approx(1 / 730)
    assert by_w[2.0]["judge_precision"] == 0.0
    assert result["choices"]["entropy"]["weight"] == 1.0  # the paper's rule alone would take w=2 (below)
    assert result["judge"]["min_judge_ratio"] == 0.5 and result["judge"]["real_reference"] == 8
    assert sum("judge acc" in line and "judge precision" in line for line in lines) == 3
    plain = calibrate(fake_generate, LABELS, ["entropy"], [1.0, 2.0], tmp_path / "plain", per_class_in_grid=1)
    assert plain["choices"]["entropy"]["weight"] == 2.0
    assert "judge" not in plain and not any(k.startswith("judge") for p in plain["points"] for k in p)
    assert "baseline_judge_accuracy" not in plain["choices"]["entropy"]


def test_calibrate_refuses_a_judge_of_other_classes(tmp_path):
    judge = Judge(Brightness(), ["dark", "bright"])
    calls: list[object] = []

    def never(guidance):
        calls.append(guidance)
        return fake_generate(guidance)

    with pytest.raises(ValueError, match=r"\['dark', 'bright'\].*\['coat', 'bag'\]"):
        calibrate(never, LABELS, ["entropy"], [1.0], tmp_path, judge=judge, class_names=["coat", "bag"])
    assert calls == []  # checked before any generation
    with pytest.raises(ValueError, match="need a judge"):
        calibrate(never, LABELS, ["entropy"], [1.0], tmp_path, min_judge_ratio=0.5)
    with pytest.raises(ValueError, match="need a judge"):
        sweep(never, ["entropy"], [1.0], real_images=real_reference()[0])
