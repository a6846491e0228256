"""The judges and the nuisance-mode detector that ship with the package (scripts/ship_detectors.py): they load,
name the right classes, do their job on the real test set, and ``judge.spec: shipped`` is checked before work."""

import pytest
import torch

from longtail.config import ConfigError
from longtail.data.datasets import FASHION_MNIST_CLASSES, DataError, load_fashion_mnist, to_model_range
from longtail.data.nuisance import nuisance_test_split
from longtail.evaluation.judge import SHIPPED_JUDGES, copy_judge, load_judge, shipped_judge_dir
from longtail.evaluation.modes import DETECTOR_CLASSES, SHIPPED_DETECTOR, detector_report
from longtail.jobs.mine import load_demo_config
from longtail.jobs.mine_config import check_config


def _test_set(n: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        raw, labels = load_fashion_mnist("test")
    except DataError:
        pytest.skip("Fashion-MNIST is not installed")
    keep = torch.arange(0, len(labels), len(labels) // n)[:n]  # every 5th image: all classes alike
    return to_model_range(raw[keep]), labels[keep]


def accuracy(judge, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((judge.probs(images).argmax(-1).cpu() == labels).float().mean())


@pytest.mark.parametrize("model", sorted(SHIPPED_JUDGES))
def test_shipped_judges_load_with_the_classes_and_recognise_real_test_images(model, tmp_path):
    folder = copy_judge(shipped_judge_dir(model), tmp_path / "judge")  # as a run copies it
    judge = load_judge(folder)
    judge.check_classes(list(FASHION_MNIST_CLASSES))
    assert judge.model.training is False
    images, labels = _test_set()
    assert accuracy(judge, images, labels) >= 0.85  # measured 0.908 clean, 0.894 nuisance (every 5th test image)


def test_the_nuisance_judge_knows_the_modes_better_than_the_clean_one():
    images, labels = _test_set()
    moded, same = nuisance_test_split(images, labels, "all", seed=0)
    clean, nuisance = (load_judge(shipped_judge_dir(m)) for m in ("clean", "nuisance"))
    assert accuracy(nuisance, moded, same) > accuracy(clean, moded, same) + 0.2  # measured 0.733 vs 0.405


def test_the_shipped_detector_names_the_modes():
    detector = load_judge(SHIPPED_DETECTOR, name="mode detector")
    detector.check_classes(list(DETECTOR_CLASSES))
    images, _ = _test_set()
    report = detector_report(detector, images)
    assert report["accuracy"] >= 0.97 and report["clean_false_alarm"] <= 0.02
    assert min(report["recall"].values()) >= 0.9


def test_judge_spec_shipped_is_refused_where_no_shipped_judge_fits(tmp_path):
    assert shipped_judge_dir(None) == shipped_judge_dir("clean")
    with pytest.raises(ConfigError, match=r"generator.model='runs/my-gen'"):
        check_config(load_demo_config(overrides=[f"out={tmp_path}", "judge.spec=shipped",
                                                 "generator.model=runs/my-gen"]))
    with pytest.raises(ConfigError, match=r"judge\.spec=shipped is the embedded Fashion-MNIST default"):
        check_config(load_demo_config(overrides=[f"out={tmp_path}", "judge.spec=shipped", "generator.kind=sd",
                                                 "generator.model=x"]))
    check_config(load_demo_config(overrides=[f"out={tmp_path}", "judge.spec=shipped"]))  # the demo's own


def test_copy_judge_refuses_a_folder_without_a_judge(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"classifier\.json missing"):
        copy_judge(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
