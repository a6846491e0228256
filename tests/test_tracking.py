"""`longtail mine` with ``track``: the setting is checked before any work, and with TensorBoard a tiny run logs
per-round accuracy (step = round), the sweep points and grids, and the summary under ``<out>/tracking/``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from longtail.config import ConfigError, load_config
from longtail.jobs import tracking
from longtail.jobs.mine import MineConfig, run_mine
from longtail.testing import tiny_generator
from test_mine import base_overrides, write_folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """test_mine's world, less what this module does not use: 3 classes x 8 images, a tiny generator."""
    from longtail.train import make_classifier

    root = tmp_path_factory.mktemp("track")
    train, val = write_folder(root / "train", 8), write_folder(root / "val", 4, seed=1)
    torch.manual_seed(0)
    save_file(make_classifier(3, width=8, num_heads=3).state_dict(), str(root / "clf.safetensors"))
    return {"root": root, "train": train, "val": val, "gen": tiny_generator(root / "gen")}


def quiet(_msg: str) -> None:
    pass


def test_tags_and_config_are_what_every_tracker_accepts():
    assert tracking.tag("mining", "bestof:total@3", "seed_0", "few") == "mining/bestof_total_3/seed_0/few"
    flat = tracking.flat_config({"a": {"b": 1, "c": [1, 2], "d": None}, "e": "x", "f": True})
    assert flat == {"a.b": 1, "a.c": "[1, 2]", "a.d": "null", "e": "x", "f": True}
    off = tracking.RunTracker("none")  # track: none does nothing, whatever it is given
    off.rounds(0, "ltg", [{"round": 1, "few": 0.5}])
    off.sweep({"points": [{"signal": "total", "weight": 1.0}]}, Path("nowhere"))
    off.finish({})


class FakeAccelerator:
    """What RunTracker uses of an Accelerator: the main process's ``log`` and its trackers."""

    is_main_process = True

    def __init__(self) -> None:
        self.logged: list[tuple[dict, int | None]] = []
        self.trackers: list = []

    def log(self, values: dict, step: int | None = None) -> None:
        self.logged.append((values, step))


@pytest.mark.parametrize("track", ["tensorboard", "wandb"])
def test_each_round_sweep_point_and_summary_number_goes_to_its_step(track):
    acc = FakeAccelerator()
    tracker = tracking.RunTracker(track, acc, Path("run"))
    history = [{"round": 0, "top1": 0.5, "few": 0.1, "many": None}, {"round": 1, "top1": 0.6, "few": 0.2},
               {"round": 2, "top1": 0.7, "few": float("nan")}]
    tracker.rounds(3, "bestof:total@2", history)
    tracker.sweep({"points": [{"signal": "total", "weight": 2.0, "mean_signal": 1.5, "mean_p_class": 0.4,
                               "accuracy": 0.3, "judge_accuracy": 0.9},
                              {"signal": "total", "weight": 0.0, "mean_signal": 1.0, "mean_p_class": 0.8,
                               "accuracy": 0.7, "judge_accuracy": 0.95}],
                   "choices": {"total": {"weight": 2.0}}}, Path("no-grids-here"))
    tracker.finish({"base": {"few": {"mean": 0.1, "std": 0.0, "n": 1}},
                    "conditions": {"ltg": {"few": {"mean": 0.25, "std": 0.05, "n": 2}}},
                    "per_seed": {"3": {"mining": {"ltg": history}}}})

    def at(name: str) -> dict:
        """{step: value} of one tag, wherever the tracker put the step."""
        found = {}
        for values, step in acc.logged:
            if name in values:
                if track == "wandb":  # one increasing step per run: the step is a value of the tag's axis
                    assert step is None
                    step = values["sweep/point" if name.startswith("sweep/") else "round"]
                found[step] = values[name]
        return found

    prefix = "mining/bestof_total_2/seed_3"
    assert at(f"{prefix}/top1") == {0: 0.5, 1: 0.6, 2: 0.7}
    assert at(f"{prefix}/few") == {0: 0.1, 1: 0.2}  # NaN and None are left out
    assert at(f"{prefix}/many") == {}
    assert at("sweep/total/weight") == {0: 0.0, 1: 2.0}  # unguided first, by weight
    assert at("sweep/total/p_class") == {0: 0.8, 1: 0.4} and at("sweep/total/judge_accuracy") == {0: 0.95, 1: 0.9}
    assert at("sweep/total/signal") == {0: 1.0, 1: 1.5} and at("sweep/total/chosen_weight") == {0: 2.0}
    assert at("summary/ltg/few") == {2: 0.25} and at("summary/ltg/few_std") == {2: 0.05}
    assert at("summary/base/few") == {2: 0.1} and at("summary/base/few_std") == {}  # one seed: no spread
    assert not tracker.on  # finished: later calls do nothing
    count = len(acc.logged)
    tracker.rounds(0, "ltg", history)
    assert len(acc.logged) == count


@pytest.mark.parametrize(("track", "match"), [
    ("tensorbord", "track must be one of none, tensorboard, wandb, mlflow, got 'tensorbord'"),
    ("wandb", "track: wandb needs the wandb package, which is not installed: pip install wandb"),
    ("mlflow", "track: mlflow needs the mlflow package, which is not installed: pip install mlflow"),
])
def test_a_bad_or_unavailable_tracker_is_named_before_any_work(world, tmp_path, track, match):
    if track != "tensorbord" and importlib.util.find_spec(track) is not None:
        pytest.skip(f"{track} is installed here")
    out = tmp_path / "run"
    cfg = load_config(MineConfig, overrides=[*base_overrides(world, out), f"track={track}"])
    with pytest.raises(ConfigError, match=match.replace("(", r"\(")):
        run_mine(cfg, show=False, log=quiet)
    assert not out.exists()  # nothing made: no run directory, no tracking folder


def test_tensorboard_logs_rounds_sweep_grids_and_summary(world, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    over = [*base_overrides(world, out), "track=tensorboard", "sweep.signals=[total]", "sweep.weights=[1.0]",
            "sweep.images_per_class=1", "distances=false", "report=false"]
    result = run_mine(load_config(MineConfig, overrides=over), show=False, log=quiet)

    logs = out / "tracking" / tracking.PROJECT
    assert list(logs.glob("events.out.tfevents.*")), sorted(p.name for p in (out / "tracking").rglob("*"))
    acc = event_accumulator.EventAccumulator(str(logs), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])

    def series(name: str) -> dict[int, float]:
        return {e.step: e.value for e in acc.Scalars(name)}

    # per round (step = round, 0 = the base classifier), the numbers of metrics.json
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["per_seed"]["0"]["mining"]["ltg"]
    assert [h["round"] for h in history] == [0, 1, 2]
    for key in ("top1", "many", "medium", "few"):
        name = f"mining/ltg/seed_0/{key}"
        expected = {h["round"]: h[key] for h in history if h.get(key) is not None}
        if not expected:  # a group without classes (8 images per class: all of them are "few")
            assert name not in scalars
            continue
        assert series(name) == pytest.approx(expected, rel=1e-6)
    assert series("mining/ltg/seed_0/few")[1] == pytest.approx(history[1]["few"], rel=1e-6)
    assert result["per_seed"]["0"]["mining"]["ltg"][1]["few"] == history[1]["few"]

    # the sweep: a point per weight (unguided first), as in sweep.json, and the chosen weight
    sweep = json.loads((out / "sweep" / "sweep.json").read_text())
    points = sorted((p for p in sweep["points"] if p["signal"] == "total"), key=lambda p: p["weight"])
    assert series("sweep/total/weight") == pytest.approx({0: 0.0, 1: 1.0})
    assert series("sweep/total/p_class") == pytest.approx({i: p["mean_p_class"] for i, p in enumerate(points)},
                                                          rel=1e-6)
    assert series("sweep/total/signal") == pytest.approx({i: p["mean_signal"] for i, p in enumerate(points)},
                                                         rel=1e-6)
    assert "sweep/total/accuracy" in scalars
    chosen = sweep["choices"]["total"]["weight"]  # None when the rule passed no weight
    assert (series("sweep/total/chosen_weight") == {0: chosen}) if chosen is not None else (
        "sweep/total/chosen_weight" not in scalars)
    assert "sweep/total/judge_accuracy" not in scalars  # no judge in this run

    # the sweep grid as an image, the size of the PNG
    assert "sweep/grid_total" in images
    (event,) = acc.Images("sweep/grid_total")
    with Image.open(out / "sweep" / "grid_total.png") as png:
        assert (event.width, event.height) == png.size

    # the summary, at the last round: mean (and std) per condition, and the base classifier
    last = {e.step for e in acc.Scalars("summary/ltg/few")}
    assert last == {2}
    assert acc.Scalars("summary/ltg/few")[0].value == pytest.approx(metrics["conditions"]["ltg"]["few"]["mean"],
                                                                      rel=1e-6)
    assert acc.Scalars("summary/base/top1")[0].value == pytest.approx(metrics["base"]["top1"]["mean"], rel=1e-6)
    assert np.isfinite([e.value for e in acc.Scalars("summary/ltg/top1")]).all()
    # the resolved config as hyperparameters (accelerate's add_hparams writes them in a subfolder)
    assert list(logs.glob("*/hparams.yml"))
