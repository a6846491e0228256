"""The embedded demo (a `longtail mine` config) end to end on a tiny config: fake data, random-weight generator,
a few steps per stage."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from helpers import chromium_dom, fake_fashion_mnist
from longtail.config import load_config
from longtail.jobs.mine import IntrospectionSpec, MineConfig, load_demo_config, run_mine
from longtail.testing import tiny_generator

ROUNDS, PER_ROUND = 2, 10


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return fake_fashion_mnist(root / "data"), tiny_generator(root / "gen")


def overrides(out: Path, data: Path, gen: Path) -> list[str]:
    return [
        f"out={out}", f"generator.model={gen}", f"data.data_dir={data}", "data.n_max=30", "data.imbalance=10",
        "data.many=20", "data.few=5", "seeds=[0]", "base.epochs=2", "generator.num_steps=2",
        "generator.batch_size=16", "sweep.signals=[entropy,total]", "sweep.weights=[0.5,2.0]",
        "sweep.images_per_class=2", *rounds(ROUNDS), f"schedule.per_round={PER_ROUND}",
        # the demo's nuisance testbed, judge, options and introspection only where a test asks for them
        "data.nuisance=null", "data.nuisance_eval=[]", "sweep.options=[]", "judge.spec=null", "judge.min_ratio=null",
        "introspection.enabled=false", "conditions=[none, unguided, ltg]",
        "generator_check.per_class=0",  # a random-weight generator draws no class (tests/test_generator_check.py)
    ]


def rounds(n: int) -> list[str]:
    """``n`` generation rounds, one fine-tuning epoch after each."""
    return [f"schedule.epochs={n}", f"schedule.generate_at={list(range(n))}"]


def manifest(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_mini_demo_writes_a_complete_consistent_run(tmp_path, parts):
    out = tmp_path / "run"
    cfg = load_demo_config(overrides=overrides(out, *parts))
    assert cfg.data.source == "fashion_mnist_lt" and cfg.schedule.restart
    summary = run_mine(cfg, show=False, log=lambda _msg: None)

    assert (out / "config.yaml").is_file() and (out / "summary.txt").is_file()
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(summary))
    assert load_config(MineConfig, out / "config.yaml") == cfg  # the resolved config reproduces the run
    assert (out / "report.html").is_file() and (out / "seed_0" / "base" / "classifier.json").is_file()
    dom = chromium_dom(out / "report.html", tmp_path / "profile")
    if dom is not None:  # the demo run's own report, rendered: its mining sections are there
        assert '<section id="rounds">' in dom and '<section id="synthetic">' in dom
    # detection: every signal, AUROC in [0, 1]
    assert set(summary["detection"]) == {"entropy", "energy", "total", "aleatoric", "epistemic"}
    for d in summary["detection"].values():
        assert 0.0 <= d["auroc_hard"]["mean"] <= 1.0
    # sweep: unguided + 2 weights per signal, a weight choice and a grid per signal, timing measured
    points = summary["sweep"]["points"]
    assert sorted((p["signal"], p["weight"]) for p in points) == sorted(
        (s, w) for s in ("entropy", "total") for w in (0.0, 0.5, 2.0))
    assert all(p["n"] == 20 for p in points)
    for s in ("entropy", "total"):
        assert (out / "sweep" / f"grid_{s}.png").stat().st_size > 0
    assert summary["sweep"]["timing"]["slowdown"] > 0
    stages = summary["stage_seconds"]  # where the time went, every stage that ran, in order
    assert list(stages)[:3] == ["base", "judge", "sweep"]
    assert {"mining none", "mining unguided", "mining ltg"} <= set(stages)
    assert all(v >= 0 for v in stages.values()) and sum(stages.values()) <= summary["seconds"]
    assert "by stage (s): base " in (out / "summary.txt").read_text()
    assert len(summary["settings_sha256"]) == 64  # the run's identity: a hash of its result-defining settings
    weight = summary["ltg"]["weight"]
    assert weight in (0.5, 2.0)
    # mining: three conditions, ROUNDS rounds each, synthetic stores consistent with the rounds
    seed_dir = out / "seed_0" / "mining"
    for cond in ("none", "unguided", "ltg"):
        history = summary["per_seed"]["0"]["mining"][cond]
        assert [h["round"] for h in history] == list(range(ROUNDS + 1))
        assert summary["conditions"][cond]["few"]["mean"] == history[-1]["few"]
        for r in range(1, ROUNDS + 1):
            assert (seed_dir / cond / f"round_{r}" / "classifier.safetensors").is_file()
        expected = 0 if cond == "none" else ROUNDS * PER_ROUND
        assert history[-1]["synthetic"] == expected
        if cond == "none":
            assert not (seed_dir / cond / "synthetic").exists()
            continue
        rows = manifest(seed_dir / cond / "synthetic" / "manifest.csv")
        assert len(rows) == expected and len({r["id"] for r in rows}) == expected
        assert all((seed_dir / cond / "synthetic" / r["path"]).is_file() for r in rows)
        assert not list((seed_dir / cond / "synthetic").glob("manifest.part-*"))
        assert {float(r["weight"]) for r in rows} == {weight if cond == "ltg" else 0.0}
        assert sorted(int(r["round"]) for r in rows) == sorted([1] * PER_ROUND + [2] * PER_ROUND)
        assert {r["class_name"] for r in rows} == set(cfg_classes())


def cfg_classes():
    from longtail.data.datasets import FASHION_MNIST_CLASSES

    return FASHION_MNIST_CLASSES


def test_demo_resumes_after_a_kill(tmp_path, parts):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "longtail", "demo", "--no-progress"]
    for item in [*overrides(out, *parts), *rounds(3)]:
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = out / "seed_0" / "mining" / "none" / "round_2" / "metrics.json"
    deadline = time.time() + 120
    while not marker.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.is_file(), proc.stderr.read().decode()[-2000:]
    assert not (out / "metrics.json").is_file(), "the run finished before the kill; the test needs a slower config"
    base_ckpt = out / "seed_0" / "base" / "classifier.safetensors"
    assert (out / "seed_0" / "base" / "heads.safetensors").is_file()
    sweep_json = out / "sweep" / "sweep.json"
    stamps = {p: p.stat().st_mtime_ns for p in (base_ckpt, sweep_json, marker)}

    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()), "finished stages were redone"
    summary = json.loads((out / "metrics.json").read_text())
    for cond in ("unguided", "ltg"):
        rows = manifest(out / "seed_0" / "mining" / cond / "synthetic" / "manifest.csv")
        assert len(rows) == 3 * PER_ROUND == len({r["id"] for r in rows})
        assert summary["per_seed"]["0"]["mining"][cond][-1]["synthetic"] == 3 * PER_ROUND
    assert not list(out.rglob("*.tmp"))


def test_mini_introspection_end_to_end(tmp_path, parts):
    """Keywords of guided vs unguided captions -> refined prompts -> the introspect condition generates from them."""
    out = tmp_path / "run"
    over = [*overrides(out, *parts), "conditions=[none, gif, introspect]", *rounds(1),
            "introspection.images_per_class=4", "introspection.pairs=2", "trajectory=false"]
    summary = run_mine(load_demo_config(overrides=over), show=False, log=lambda _msg: None)
    prompts = json.loads((out / "introspection" / "prompts.json").read_text())
    keywords = json.loads((out / "introspection" / "keywords.json").read_text())
    assert set(prompts) == set(cfg_classes()) == set(keywords)
    min_distance = load_demo_config().introspection.min_distance
    assert min_distance > IntrospectionSpec().min_distance == 0.0  # the demo's setting; the library's is the paper's
    assert all(k["distance"] >= min_distance for pairs in keywords.values() for p in pairs for k in p["keywords"])
    for name, texts in prompts.items():
        article = "an" if name[0] in "aeiou" else "a"
        assert texts and all(t.startswith(f"a photo of {article} {name}") for t in texts)
    rows = manifest(out / "seed_0" / "mining" / "introspect" / "synthetic" / "manifest.csv")
    assert len(rows) == PER_ROUND and all((r["prompt_full"] or r["prompt"]) in prompts[r["class_name"]] for r in rows)
    assert {"none", "gif", "introspect"} == set(summary["conditions"])


def test_judge_trained_once_and_its_columns_in_the_sweep(tmp_path, parts):
    """judge.spec=train: a classifier trained on the full balanced set (not the guided one) scores every sweep
    point; with judge.min_ratio the weight rule also needs the judge to recognise the class."""
    out = tmp_path / "run"
    over = [*overrides(out, *parts), "conditions=[none]", *rounds(1), "trajectory=false", "distances=false",
            "judge.spec=train", "judge.epochs=1", "judge.min_ratio=0.9", "judge.real_per_class=5"]
    lines: list[str] = []
    summary = run_mine(load_demo_config(overrides=over), show=False, log=lines.append)
    assert (out / "judge" / "classifier.json").is_file()
    points = summary["sweep"]["points"]
    assert all(0.0 <= p["judge_accuracy"] <= 1.0 and 0.0 <= p["judge_p_class"] <= 1.0 for p in points)
    assert summary["sweep"]["judge"]["min_judge_ratio"] == 0.9
    for name, choice in summary["sweep"]["choices"].items():
        if choice["weight"] is not None:  # a chosen weight keeps >= 90% of the unguided judge accuracy
            chosen = next(p for p in points if p["signal"] == name and p["weight"] == choice["weight"])
            assert chosen["judge_accuracy"] >= 0.9 * choice["baseline_judge_accuracy"] - 1e-9
        else:  # the rule passed none: the log says which weight mining uses instead
            assert f"weight for {name}: the rule passed none, so mining uses the smallest swept weight" in "\n".join(
                lines)


def test_the_shipped_judge_is_copied_into_the_run_not_trained(tmp_path, parts):
    """judge.spec=shipped with the shipped nuisance generator: the run holds the shipped judge's very bytes."""
    from longtail.evaluation.judge import shipped_judge_dir

    out = tmp_path / "run"
    over = [*overrides(out, *parts), "generator.model=nuisance", "conditions=[none]", *rounds(1),
            "trajectory=false", "distances=false", "sweep.signals=[total]", "sweep.weights=[1.0]",
            "sweep.images_per_class=1", "judge.spec=shipped", "judge.min_ratio=0.9", "judge.real_per_class=2"]
    said: list[str] = []
    summary = run_mine(load_demo_config(overrides=over), show=False, log=said.append)
    shipped = shipped_judge_dir("nuisance")
    for name in ("classifier.safetensors", "classifier.json", "class_names.json"):
        assert (out / "judge" / name).read_bytes() == (shipped / name).read_bytes()
    assert any("the shipped one for the nuisance generator" in m for m in said)
    assert not any("training the judge" in m for m in said)
    assert all("judge_accuracy" in p for p in summary["sweep"]["points"])


@pytest.mark.parametrize("shipped_detector", [True, False])
def test_validation_split_nuisance_modes_hard_split_and_extra_splits(tmp_path, parts, monkeypatch, shipped_detector):
    """Settings chosen on a validation split of unused training images; rare modes inside classes; the hard
    split (what most base classifiers get wrong) and the nuisance splits reported per condition. The mode
    detector is the shipped one, copied, or (without it) trained in the run."""
    import longtail.evaluation.modes as modes

    shipped = (modes.SHIPPED_DETECTOR / "classifier.safetensors").read_bytes()
    if not shipped_detector:
        monkeypatch.setattr(modes, "SHIPPED_DETECTOR", tmp_path / "none")
    out = tmp_path / "run"
    over = [*overrides(out, *parts), "data.n_max=20", "seeds=[0, 1]", "conditions=[none, unguided]", *rounds(1),
            "trajectory=false", "distances=false", "sweep.signals=[total]", "sweep.weights=[1.0]",
            "data.eval_split=val", "data.val_per_class=5", "data.nuisance={invert: 0.1, corner: 0.1}",
            "data.nuisance_eval=[invert, all]"]
    lines: list[str] = []
    summary = run_mine(load_demo_config(overrides=over), show=False, log=lines.append)
    assert summary["evaluated_on"].startswith("Fashion-MNIST validation split")
    assert sum(summary["per_seed"]["0"]["base"]["per_class"]) > 0
    for cond in ("none", "unguided"):
        assert summary["conditions"][cond]["hard"]["n"] == 2
        assert set(summary["splits"]) == {"nuisance:invert", "nuisance:all"}
        assert summary["splits"]["nuisance:invert"][cond]["n"] == 2
    assert summary["paired"]["table"]["none"]["hard"]["n"] == 2
    # round 0 (the base classifier) is evaluated once per seed and shared; the extra splits only at the end
    round0 = [json.loads((out / "seed_0" / "mining" / c / "round_0" / "metrics.json").read_text())
              for c in ("none", "unguided")]
    assert round0[0] == round0[1] and "splits" not in round0[0]
    final = json.loads((out / "seed_0" / "mining" / "unguided" / "round_1" / "metrics.json").read_text())
    assert set(final["splits"]) == {"nuisance:invert", "nuisance:all"}
    shares = summary["mode_shares"]["unguided"]  # the modes seen in the synthetic data, pooled over seeds
    assert set(shares) >= {"all"} and all(0.0 <= v <= 1.0 for v in shares["all"].values())
    assert len(shares["all"]) == 8 and (out / "modes" / "detector" / "classifier.json").is_file()
    detector = summary["mode_detector"]  # measured on the test set with modes applied
    assert set(detector["recall"]) == set(shares["all"]) and 0.0 <= detector["clean_false_alarm"] <= 1.0
    text = "\n".join(lines)
    copied = (out / "modes" / "detector" / "classifier.safetensors").read_bytes()
    assert (copied == shipped) is shipped_detector
    assert ("training the nuisance-mode detector" in text) is not shipped_detector
    assert "hard split" in text and "extra splits" in text and "paired difference to unguided" in text
    assert "nuisance modes in the synthetic data" in text and "detector recall" in text


def test_validation_split_never_overlaps_the_training_subset(tmp_path, parts):
    import torch

    from longtail.data.datasets import load_fashion_mnist, longtail_counts, longtail_indices
    from longtail.data.sources import FashionMNISTLT, validation_indices

    data = parts[0]
    _, labels = load_fashion_mnist("train", data)
    used = longtail_indices(labels, longtail_counts(20, 10, 10), 0)
    val = validation_indices(labels, used, 5, 0)
    assert not torch.isin(val, used).any() and torch.bincount(labels[val]).tolist() == [5] * 10
    source = FashionMNISTLT(data, n_max=20, imbalance=10, eval_split="val", val_per_class=5,
                            nuisance={"invert": 0.5}, nuisance_eval=["invert"])
    assert len(source.eval_y) == 50 and int((source.train_modes >= 0).sum()) == round(0.5 * sum(source.train_counts))
    (x, y), = source.extra.values()
    assert torch.equal(x, -source.eval_x) and torch.equal(y, source.eval_y)  # invert = -x on every image
    with pytest.raises(ValueError, match="val_per_class=25"):
        FashionMNISTLT(data, n_max=20, imbalance=10, eval_split="val", val_per_class=25)


def test_efficiency_curve_nested_sets_counts_and_paired_differences(tmp_path, parts):
    """efficiency.sizes: one round of n images per class per condition and seed; smaller sets are the first n
    jobs of the largest (copied, identical files), best-of-N keeps exactly n per class from n x N candidates."""
    out = tmp_path / "run"
    over = [*overrides(out, *parts), "seeds=[0, 1]", "conditions=[unguided, ltg, 'bestof@2']", *rounds(1),
            "trajectory=false", "distances=false", "report=false", "sweep.signals=[total]", "sweep.weights=[1.0]",
            "efficiency.sizes=[1, 3]", "efficiency.epochs=1"]
    lines: list[str] = []
    summary = run_mine(load_demo_config(overrides=over), show=False, log=lines.append)
    eff = summary["efficiency"]
    assert eff["sizes"] == [1, 3] and eff["conditions"] == ["unguided", "ltg", "bestof@2"]
    for cond, folder in (("unguided", "unguided"), ("ltg", "ltg"), ("bestof@2", "bestof_w2")):
        for n in (1, 3):
            assert eff["table"][cond][str(n)]["few"]["n"] == 2
            for s in (0, 1):
                rows = manifest(out / f"seed_{s}" / "efficiency" / f"n{n}" / folder / "synthetic" / "manifest.csv")
                assert sorted(Counter(r["class_name"] for r in rows).values()) == [n] * 10
    small, large = (out / "seed_0" / "efficiency" / f"n{n}" / "ltg" / "synthetic" for n in (1, 3))
    for row in manifest(small / "manifest.csv"):  # nested: the same job, the same image
        assert int(row["index"]) == 0 and (small / row["path"]).read_bytes() == (large / row["path"]).read_bytes()
    candidates = manifest(out / "seed_0" / "efficiency" / "n1" / "bestof_w2" / "candidates" / "manifest.csv")
    assert sorted(int(r["index"]) for r in candidates) == [0] * 10 + [1] * 10
    assert set(eff["paired"]["3"]) == {"ltg", "bestof@2"} and eff["paired"]["3"]["ltg"]["few"]["n"] == 2
    assert "data efficiency" in "\n".join(lines)


def test_efficiency_settings_that_cannot_work_are_named(tmp_path, parts):
    from longtail.config import ConfigError

    base = [*overrides(tmp_path / "run", *parts), "conditions=[none, unguided]"]
    for bad, message in (("heads.init=random", "heads.init"), ("heads.epsilon=1.5", "heads.epsilon"),
                         ("efficiency.sizes=[0, 5]", "efficiency.sizes"),
                         ("efficiency.conditions=[ltg]", "efficiency.conditions"),
                         ("efficiency.epochs=-1", "efficiency.epochs")):
        extra = ["efficiency.sizes=[2]", bad] if bad.startswith(("efficiency.conditions", "efficiency.epochs")) else [bad]
        with pytest.raises(ConfigError, match=message):
            run_mine(load_demo_config(overrides=[*base, *extra]), dry_run=True, show=False, log=lambda _m: None)


def test_sweep_compares_guidance_options_at_the_chosen_weight(tmp_path, parts):
    out = tmp_path / "run"
    over = [*overrides(out, *parts), "conditions=[none]", *rounds(1), "trajectory=false", "distances=false",
            "report=false", "sweep.signals=[entropy, total]", "sweep.weights=[1.0]", "guidance.signal=total",
            "sweep.options=[{views: 2, view_shift: 0.1}, {lowpass: 1.0}, {lowpass: 0.0}]",
            "heads.bootstrap=true", "heads.epsilon=0.8"]  # bagged heads (benchmarks/heads_variants.py)
    lines: list[str] = []
    summary = run_mine(load_demo_config(overrides=over), show=False, log=lines.append)
    options = summary["sweep"]["options"]
    assert options["signal"] == "total" and options["weight"] == 1.0
    assert options["columns"] == ["unguided", "w = 1", "views=2, view_shift=0.1", "lowpass=1", "lowpass=0"]
    assert [p["n"] for p in options["points"]] == [20] * 3 and all(p["seconds"] > 0 for p in options["points"])
    plain = next(p for p in summary["sweep"]["points"] if p["signal"] == "total" and p["weight"] == 1.0)
    assert options["points"][2]["mean_signal"] == plain["mean_signal"]  # an option that changes nothing
    from PIL import Image

    width, height = Image.open(out / "sweep" / "grid_options.png").size
    assert (width, height) == (2 + 2 * (5 * 32 + 2), 2 + 10 * (32 + 2))  # a row per class: 2 tiles of 5 columns
    assert any("option lowpass=1" in line for line in lines)
    from longtail.config import ConfigError

    for bad, message in (("sweep.options=[{viewz: 2}]", r"sweep.options\[0\].*unknown guidance option"),
                         ("sweep.options=[{views: 0}]", r"sweep.options\[0\].*views must be >= 1"),
                         ("sweep.options=[{}]", r"sweep.options\[0\] must be a mapping")):
        with pytest.raises(ConfigError, match=message):
            run_mine(load_demo_config(overrides=[*over, f"out={tmp_path / 'bad'}", bad]), dry_run=True, show=False,
                     log=lambda _m: None)
