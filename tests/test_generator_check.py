"""The generator check: before any long work, `mine`, `generate` and `calibrate` generate a few unguided images per
class and refuse (exit 2) a generator that does not draw some of the run's classes; `--force` warns instead.

The "accepted" cases use the shipped clean generator (real weights, 4 steps) and the shipped clean judge (a real
Fashion-MNIST classifier) as the classifier; the "refused" cases point that Fashion-MNIST generator at classes it
cannot draw, through a prompt file (which lifts the by-name check of ``check_generator_classes``)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import longtail
from longtail.config import ConfigError, load_config
from longtail.files import write_json
from longtail.jobs.generator_check import (
    FILE,
    GRID,
    GeneratorCheckError,
    GeneratorCheckSpec,
    at_chance,
    decide,
    witness_accuracy,
)

ASSETS = Path(longtail.__file__).resolve().parent / "assets"
FASHION_CLASSIFIER = ASSETS / "judge-clean" / "classifier.json"  # a real Fashion-MNIST classifier (SmallCNN)
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def strict(path: Path):
    """``path`` parsed as RFC 8259 JSON: NaN / Infinity are refused."""
    def refuse(token: str):
        raise ValueError(f"{path}: non-strict JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def quiet(_msg: str) -> None:
    pass


# --- 1. the rule ----------------------------------------------------------------------------------------------


def test_the_rule_names_the_class_at_chance_with_exact_numbers(tmp_path):
    """C = 4, 4 images per class. ``ok``: recognised; ``near``: always taken for its neighbour but with P(class)
    0.4 > 1.5/4 (drawn, merely confused: passes); ``gone``: never top class, P 0.05 (refused); ``blind``: as
    ``gone``, but the classifier misses most real images of it too (unverified, unless a judge sees it)."""
    names = ["ok", "near", "gone", "blind"]
    rows = {0: [0.7, 0.1, 0.1, 0.1], 1: [0.05, 0.4, 0.5, 0.05], 2: [0.85, 0.05, 0.05, 0.05],
            3: [0.85, 0.05, 0.05, 0.05]}
    labels = torch.arange(4).repeat_interleave(4)
    probs = torch.tensor([rows[int(c)] for c in labels])
    result = decide({"classifier": probs}, labels, names)
    assert result["refused"] == ["gone", "blind"] and result["unverified"] == []
    c = result["classes"]
    assert c["ok"] == {"n": 4, "accuracy": 1.0, "p_class": pytest.approx(0.7), "verdict": "ok"}
    assert c["near"] == {"n": 4, "accuracy": 0.0, "p_class": pytest.approx(0.4), "verdict": "ok"}
    assert c["gone"] == {"n": 4, "accuracy": 0.0, "p_class": pytest.approx(0.05), "verdict": "refused"}
    assert result["thresholds"]["accuracy"] == 0.25 and result["thresholds"]["p_class"] == 0.375

    # with the classifier's accuracy on real images: a witness only where it could have recognised the class
    real = {"classifier": [0.9, 0.9, 0.9, 0.2]}
    result = decide({"classifier": probs}, labels, names, real_accuracy=real)
    assert result["refused"] == ["gone"] and result["unverified"] == ["blind"]
    assert result["classes"]["blind"]["real_accuracy"] == 0.2
    # a judge that recognises "blind" passes it; one at chance on "gone" too keeps it refused
    judge = probs.clone()
    judge[12:] = torch.tensor([0.0, 0.0, 0.1, 0.9])
    result = decide({"classifier": probs, "judge": judge}, labels, names, real_accuracy=real)
    assert result["refused"] == ["gone"] and result["unverified"] == []
    assert result["classes"]["blind"]["judge_accuracy"] == 1.0
    assert result["classes"]["blind"]["judge_p_class"] == pytest.approx(0.9)

    # the boundaries: at chance is accuracy <= 1/C and P(class) <= 1.5/C, both inclusive
    assert at_chance(0.25, 0.375, 4) and not at_chance(0.5, 0.1, 4) and not at_chance(0.0, 0.376, 4)
    assert at_chance(0.0, 0.15, 10) and not at_chance(0.25, 0.0, 10)  # C = 10: "0 of 4 right" and P <= 0.15
    assert witness_accuracy(4) == pytest.approx(1 - 0.05 ** 0.25) and 0.52 < witness_accuracy(4) < 0.53

    # a class without images, or NaN probabilities: no verdict against it, and strict JSON (null) on disk
    probs[8:12] = float("nan")  # "gone"'s images broke: NaN counts as P = 0
    result = decide({"classifier": probs}, labels, names, classes=[0, 1, 2, 3])
    assert result["classes"]["gone"]["accuracy"] == 0.0 and result["classes"]["gone"]["p_class"] == 0.0
    empty = decide({"classifier": probs[:4]}, labels[:4], names, classes=[0, 3])
    assert math.isnan(empty["classes"]["blind"]["accuracy"]) and empty["classes"]["blind"]["verdict"] == "ok"
    assert strict(write_json(tmp_path / "c.json", empty))["classes"]["blind"]["accuracy"] is None


# --- 2-4. generate: accepted on Fashion-MNIST, refused where it cannot draw, --force, the file ---------------


def generate_args(out: Path, *extra: str) -> list[str]:
    return ["generate", "--out", str(out), "--generator", str(ASSETS / "tiny-ldm"), "--classifier",
            str(FASHION_CLASSIFIER), "--per-class", "1", "--weight", "0", "--steps", "4", "--device", "cpu",
            "--no-progress", *extra]


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """``longtail ARGS`` in this process through the entry point (its exit code for user errors)."""
    from longtail import cli

    monkeypatch.setattr(sys, "argv", ["longtail", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_fashion_mnist_generator_is_accepted_on_fashion_mnist(tmp_path, monkeypatch, capsys):
    """The shipped generator's unguided images are recognised class by class: the job runs, the numbers are kept."""
    out = tmp_path / "gen"
    code, _, stderr = run_cli(generate_args(out), monkeypatch, capsys)
    assert code == 0, stderr[-2000:]
    check = strict(out / FILE)
    assert check["refused"] == [] and check["unverified"] == [] and check["forced"] is False
    assert check["per_class"] == 4 and check["images"] == 40 and check["scorers"] == ["classifier"]
    assert list(check["classes"]) == json.loads((ASSETS / "judge-clean" / "class_names.json").read_text())
    for row in check["classes"].values():
        assert row["n"] == 4 and row["verdict"] == "ok" and row["accuracy"] >= 0.5 and row["p_class"] > 0.5
    assert (out / GRID).stat().st_size > 0 and len(list(out.rglob("*.png"))) == 10 + 1


def test_a_class_the_generator_does_not_draw_stops_the_job_and_force_runs_it(tmp_path, monkeypatch, capsys):
    """A prompt file that prompts "bag" with a trouser (a user's slip): the generator draws trousers for "bag",
    the classifier sees no bag (accuracy 0, P(bag) ~ 0), and the job stops before generating anything, with one
    line naming the class (exit 2). ``--force`` runs it with a warning; the saved check is reused, not redone."""
    from longtail.jobs import generator_check

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"bag": "a photo of a trouser"}))
    out = tmp_path / "gen"
    args = generate_args(out, "--set", f"generator.prompt_file={prompts}")
    code, _, stderr = run_cli(args, monkeypatch, capsys)
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("longtail: error: generator check: the generator does not "
                                                         "draw bag (1 of 10 classes)")
    assert "--force" in stderr and "prompt" in stderr
    check = strict(out / FILE)  # the evidence is kept; nothing else was written
    assert check["refused"] == ["bag"] and check["forced"] is False
    assert check["classes"]["bag"]["accuracy"] == 0.0 and check["classes"]["bag"]["p_class"] < 0.01
    assert all(row["verdict"] == "ok" for name, row in check["classes"].items() if name != "bag")
    assert not (out / "config.yaml").exists() and not (out / "manifest.csv").exists()

    monkeypatch.setattr(generator_check, "_measure", lambda *a, **k: pytest.fail("the saved check was redone"))
    code, stdout, stderr = run_cli([*args, "--force"], monkeypatch, capsys)
    assert code == 0, stderr[-2000:]
    assert "warning: generator check: the generator does not draw bag" in stdout + stderr
    assert strict(out / FILE)["forced"] is True and (out / "manifest.csv").is_file()
    assert len(list((out / "bag").glob("*.png"))) == 1


def test_generate_without_a_classifier_skips_the_check_with_a_note(tmp_path):
    from longtail.jobs.generate import GenerateConfig, run_generate

    lines: list[str] = []
    cfg = load_config(GenerateConfig, overrides=[f"out={tmp_path / 'gen'}", "per_class=1", "generator.num_steps=2",
                                                  "device=cpu", "classes=[bag]"])
    run_generate(cfg, show=False, log=lines.append)
    assert any("generator check: skipped" in line and "no classifier" in line for line in lines)
    assert not (tmp_path / "gen" / FILE).exists()


def test_force_is_a_flag_of_the_three_commands(monkeypatch):
    import longtail.jobs.calibrate
    import longtail.jobs.generate
    import longtail.jobs.mine
    from longtail import cli

    seen = []
    monkeypatch.setattr(longtail.jobs.generate, "run_generate", lambda cfg, show=True: seen.append(cfg))
    monkeypatch.setattr(longtail.jobs.calibrate, "run_calibrate", lambda cfg, show=True: seen.append(cfg))
    monkeypatch.setattr(longtail.jobs.mine, "run_mine", lambda cfg, dry_run=False, show=True: seen.append(cfg))
    for command in ("generate", "calibrate", "mine"):
        for extra, force in (([], False), (["--force"], True)):
            result = CliRunner().invoke(cli.app, [command, *extra])
            assert result.exit_code == 0, result.output
            assert seen.pop().generator_check == GeneratorCheckSpec(per_class=4, force=force)


# --- 2, 3, 5. mine: a digits dataset with the Fashion-MNIST generator ---------------------------------------

SEGMENTS = {"a": (0, 0, 0), "b": (1, 0, 1), "c": (1, 1, 1), "d": (0, 2, 0), "e": (0, 1, 1), "f": (0, 0, 1),
            "g": (0, 1, 0)}  # (x offset, y offset, vertical) in units of the digit's width / half height
DIGIT_SEGMENTS = ("abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg")


def seven_segment(digit: int, rng: np.random.Generator) -> np.ndarray:
    """A 28 x 28 seven-segment digit, jittered in place and brightness: a digits-like dataset, learnable in seconds."""
    img = np.zeros((28, 28), np.uint8)
    w, h, t = 10, 9, 2
    x0, y0 = 9 + rng.integers(-3, 4), 5 + rng.integers(-2, 3)
    for s in DIGIT_SEGMENTS[digit]:
        dx, dy, vertical = SEGMENTS[s]
        x, y = x0 + dx * w, y0 + dy * h
        if vertical:
            img[y : y + h + t, x : x + t] = rng.integers(180, 256)
        else:
            img[y : y + t, x : x + w + t] = rng.integers(180, 256)
    return img


def write_digits(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for digit, name in enumerate(DIGITS):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(seven_segment(digit, rng), "L").save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    prompts = root / "prompts.json"  # what a user might try: the Fashion-MNIST generator, prompted for digits
    prompts.write_text(json.dumps({name: f"a handwritten digit {name}" for name in DIGITS}))
    return {"train": write_digits(root / "train", 12, 0), "val": write_digits(root / "val", 6, 1),
            "prompts": prompts}


def digits_overrides(digits, out: Path) -> list[str]:
    """Digits (ImageFolder, "zero".."nine"), a SmallCNN trained on them (base.epochs), the shipped Fashion-MNIST
    generator at 4 steps with a prompt file naming the digits; two seeds, a tiny schedule."""
    return [f"out={out}", f"data.train={digits['train']}", f"data.val={digits['val']}", "data.many=10", "data.few=2",
            "classifier.spec=longtail.train:SmallCNN", "classifier.num_classes=10",
            "classifier.model_kwargs={in_channels: 1, width: 8}", "classifier.preprocess={size: 32, in_channels: 1}",
            "base.epochs=12", "base.lr=0.01", "base.batch_size=16", "base.rotation=0", "base.translate=0",
            "base.hflip=false", f"generator.model={ASSETS / 'tiny-ldm'}", f"generator.prompt_file={digits['prompts']}",
            "generator.num_steps=4", "generator.batch_size=40", "guidance.signal=entropy", "guidance.weight=1.0",
            "conditions=[unguided]", "seeds=[0, 1]", "schedule.epochs=1", "schedule.per_round=10",
            "schedule.allocation=even", "finetune.batch_size=16", "finetune.num_workers=0", "distances=false",
            "report=false", "device=cpu"]


def test_mine_refuses_the_fashion_mnist_generator_on_digits_then_force_and_resume(digits, tmp_path, monkeypatch):
    """The base classifier (seed 0) learns the digits (its real per-class accuracy makes it a witness); the
    Fashion-MNIST generator, prompted for digits, draws clothes, which it does not take for those digits: the run
    stops right after seed 0's base stage (no seed 1 base, no mining). Then ``force``: the saved check is reused
    (not regenerated), a warning, and the run goes on; metrics.json carries the check."""
    from longtail.jobs import generator_check
    from longtail.jobs.mine import MineConfig, run_mine

    out = tmp_path / "run"
    over = digits_overrides(digits, out)
    with pytest.raises(GeneratorCheckError) as refused:
        run_mine(load_config(MineConfig, overrides=over), show=False, log=quiet)
    assert isinstance(refused.value, ConfigError)  # the CLI's exit code 2
    assert (out / "seed_0" / "base" / "classifier.json").is_file()
    assert not (out / "seed_1").exists() and not (out / "seed_0" / "mining").exists()
    check = strict(out / FILE)
    message = str(refused.value)
    assert "\n" not in message and f"the generator does not draw {', '.join(check['refused'])}" in message
    assert "although the classifier recognises real images of them" in message
    assert len(check["refused"]) >= 6, check["classes"]  # clothes are no digits (eight, nine may absorb them)
    for name in check["refused"]:
        row = check["classes"][name]
        assert row["n"] == 4 and row["accuracy"] == 0.0 and row["p_class"] <= 0.15
        assert row["real_accuracy"] >= witness_accuracy(4)

    monkeypatch.setattr(generator_check, "_measure", lambda *a, **k: pytest.fail("the saved check was redone"))
    lines: list[str] = []
    result = run_mine(load_config(MineConfig, overrides=[*over, "generator_check.force=true"]), show=False,
                      log=lines.append)
    assert any(line.startswith("warning: generator check: the generator does not draw") for line in lines)
    assert any("generator check: reusing" in line for line in lines)
    assert result["generator_check"]["refused"] == check["refused"] and result["generator_check"]["forced"]
    assert strict(out / "metrics.json")["generator_check"]["classes"] == check["classes"]
    assert (out / "seed_1" / "base" / "classifier.json").is_file() and "generator check" in result["stage_seconds"]


def test_calibrate_checks_before_its_sweep(tmp_path):
    from longtail.jobs.calibrate import CalibrateConfig, run_calibrate

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"sandal": "a photo of a coat"}))
    cfg = load_config(CalibrateConfig, overrides=[
        f"out={tmp_path / 'cal'}", f"classifier.spec={FASHION_CLASSIFIER}", f"generator.prompt_file={prompts}",
        "generator.num_steps=4", "signals=[entropy]", "weights=[1.0]", "per_class=1", "device=cpu"])
    with pytest.raises(GeneratorCheckError, match=r"does not draw sandal \(1 of 10 classes\)"):
        run_calibrate(cfg, show=False, log=quiet)
    assert strict(tmp_path / "cal" / FILE)["refused"] == ["sandal"]
    assert not (tmp_path / "cal" / "calibration.json").exists() and not (tmp_path / "cal" / "config.yaml").exists()


def test_mine_with_a_judge_passes_what_the_judge_recognises(tmp_path):
    """Fashion-MNIST-LT of blobs (tests/helpers.py): the base classifier knows blobs, not clothes, so it finds the
    shipped generator's clothes at chance; the run's judge (the shipped clean one) recognises every class, so the
    check passes, with both scorers' numbers in generator_check.json and metrics.json."""
    from helpers import fake_fashion_mnist
    from longtail.jobs.mine import MineConfig, run_mine

    data = fake_fashion_mnist(tmp_path / "data")
    out = tmp_path / "run"
    cfg = load_config(MineConfig, overrides=[
        f"out={out}", "data.source=fashion_mnist_lt", f"data.data_dir={data}", "data.n_max=30", "data.imbalance=10",
        "data.many=20", "data.few=5", "classifier.spec=longtail.train:SmallCNN", "classifier.num_classes=10",
        "classifier.model_kwargs={in_channels: 1, width: 8}", "classifier.preprocess={size: 32, in_channels: 1}",
        "base.epochs=4", "base.batch_size=32", f"judge.spec={ASSETS / 'judge-clean'}", "generator.num_steps=4",
        "generator.batch_size=40", "conditions=[none]", "schedule.epochs=1", "schedule.per_round=10",
        "distances=false", "report=false", "device=cpu"])
    lines: list[str] = []
    result = run_mine(cfg, show=False, log=lines.append)
    check = strict(out / FILE)
    assert check["scorers"] == ["classifier", "judge"] and check["refused"] == [] and check["unverified"] == []
    assert any("generator check: passed" in line for line in lines)
    assert all(row["judge_accuracy"] >= 0.5 and row["verdict"] == "ok" for row in check["classes"].values())
    assert any(row["accuracy"] <= 0.1 and row["p_class"] <= 0.15 for row in check["classes"].values())
    assert result["generator_check"]["classes"] == check["classes"]


def test_a_runs_classifier_json_brings_its_real_accuracy(tmp_path):
    """generate / calibrate with a run's classifier.json: the base stage's metrics.json beside it says which classes
    the classifier recognises on real images (a class it misses there is unverified, not refused)."""
    from longtail.jobs.common import ClassifierSpec
    from longtail.jobs.generator_check import real_accuracy_beside

    spec = tmp_path / "base" / "classifier.json"
    write_json(spec, {"spec": "longtail.train:SmallCNN"})
    assert real_accuracy_beside(ClassifierSpec(spec=str(spec)), 3) == (None, None)  # no metrics.json
    write_json(tmp_path / "base" / "metrics.json", {"top1": 0.5, "per_class": [0.9, 0.0, None]})
    assert real_accuracy_beside(ClassifierSpec(spec=str(spec)), 3) == ([0.9, 0.0, None], tmp_path / "base" /
                                                                       "metrics.json")
    assert real_accuracy_beside(ClassifierSpec(spec=str(spec)), 4) == (None, None)  # other classes
    assert real_accuracy_beside(ClassifierSpec(spec=str(spec), checkpoint="other.safetensors"), 3) == (None, None)
    assert real_accuracy_beside(ClassifierSpec(spec="resnet50"), 3) == (None, None)
