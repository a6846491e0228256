"""A second real domain end to end, as a user with only an ImageFolder runs it: scikit-learn's digits as a
long-tailed ImageFolder, `longtail train-generator --data`, `longtail mine` with that generator, `longtail report`."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from longtail import cli
from longtail.data.digits import DIGIT_NAMES, load_digits_images, lt_counts, write_digits_lt

pytest.importorskip("sklearn")

TINY = ["--set", "vae_channels=[8,8]", "--set", "unet_channels=[16,16]", "--set", "attention_head_dim=4",
        "--set", "max_tokens=12", "--set", "vae_epochs=1", "--set", "unet_steps=3", "--set", "batch_size=16",
        "--set", "warmup_steps=1"]


def invoke(*args: str):
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def test_digits_become_a_long_tailed_imagefolder_fixed_by_seed(tmp_path):
    images, labels = load_digits_images()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 255
    assert np.bincount(labels).min() == 174
    assert lt_counts(100, 20.0) == [100, 72, 51, 37, 26, 19, 14, 10, 7, 5]
    paths = write_digits_lt(tmp_path / "a", size=16, n_max=10, imbalance=5.0, val_per_class=2, test_per_class=3)
    split = json.loads((tmp_path / "a" / "split.json").read_text())["counts"]
    assert list(split["train"].values()) == lt_counts(10, 5.0) == [10, 8, 7, 6, 5, 4, 3, 3, 2, 2]
    assert set(split["val"].values()) == {2} and set(split["test"].values()) == {3}
    assert sorted(p.name for p in paths["train"].iterdir()) == sorted(DIGIT_NAMES)
    files = {part: sorted(f.name for f in paths[part].rglob("*.png")) for part in paths}
    assert not set(files["train"]) & set(files["val"]) and not set(files["val"]) & set(files["test"])
    with Image.open(next(paths["train"].rglob("*.png"))) as img:
        assert img.mode == "L" and img.size == (16, 16)
    again = write_digits_lt(tmp_path / "b", size=16, n_max=10, imbalance=5.0, val_per_class=2, test_per_class=3)
    assert files == {part: sorted(f.name for f in again[part].rglob("*.png")) for part in again}
    with pytest.raises(ValueError, match="fewer than"):
        write_digits_lt(tmp_path / "c", n_max=200)


def test_imagefolder_to_generator_to_mine_to_report(tmp_path):
    """The README's three commands on the digits: train-generator --data, mine with that generator (the
    classifier trained by mine itself), report."""
    paths = write_digits_lt(tmp_path / "data", size=16, n_max=8, imbalance=4.0, val_per_class=2, test_per_class=2)
    gen = tmp_path / "gen"
    invoke("train-generator", "--data", paths["train"], "--out", gen, *TINY, "--no-progress")
    meta = json.loads((gen / "longtail_generator.json").read_text())
    assert meta["class_names"] == sorted(DIGIT_NAMES) and meta["image_size"] == 16 and meta["channels"] == 1
    assert meta["data"]["counts"] == dict(zip(DIGIT_NAMES, lt_counts(8, 4.0), strict=True))

    run = tmp_path / "run"
    invoke("mine", "--train", paths["train"], "--val", paths["test"], "--out", run,
           "--classifier", "longtail.train:SmallCNN", "--set", "classifier.num_classes=10",
           "--set", "classifier.model_kwargs={in_channels: 1, width: 4}",
           "--set", "classifier.preprocess={size: 16, in_channels: 1}",
           "--set", "generator.kind=embedded", "--set", f"generator.model={gen}",
           "--set", "generator.num_steps=2", "--set", "generator.batch_size=20",
           "--set", "generator_check.per_class=1", "--set", "generator_check.force=true",
           "--set", "base.epochs=1", "--set", "base.batch_size=32", "--set", "heads.epochs=1",
           "--set", "heads.num_heads=2", "--set", "sweep.signals=[total]", "--set", "sweep.weights=[1.0]",
           "--set", "sweep.images_per_class=1", "--set", "guidance.signal=total",
           "--set", "schedule.epochs=1", "--set", "schedule.generate_at=[0]", "--set", "schedule.per_round=10",
           "--set", "schedule.allocation=even", "--set", "finetune.batch_size=32", "--set", "data.many=6",
           "--set", "data.few=3", "--set", 'conditions=[none, unguided, ltg, "bestof@2"]', "--set", "device=cpu",
           "--no-progress")
    metrics = json.loads((run / "metrics.json").read_text())
    mining = metrics["per_seed"]["0"]["mining"]
    assert set(mining) == {"none", "unguided", "ltg", "bestof@2"}
    summary = (run / "summary.txt").read_text()
    for row in ("base (LT real only)", "+ unguided synthetic", "+ LTG (total", "many", "medium", "few"):
        assert row in summary, row
    # the generator check ran with the trained generator and its 10 classes (forced: a 3-step model draws nothing)
    assert "zero" in (run / "generator_check.json").read_text()
    for cond in ("unguided", "ltg"):
        with (run / "seed_0" / "mining" / cond / "synthetic" / "manifest.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 10 and {r["class_name"] for r in rows} == set(DIGIT_NAMES)
        prompts = {r["class_name"]: r["prompt"] for r in rows}  # the prompts the generator was trained with
        assert prompts["zero"] == "a photo of a zero" and prompts["eight"] == "a photo of an eight"
    png = next((run / "seed_0" / "mining" / "ltg" / "synthetic").rglob("*.png"))
    with Image.open(png) as img:
        assert img.mode == "L" and img.size == (16, 16)
    (run / "report.html").unlink()
    invoke("report", run)
    assert (run / "report.html").is_file()


def test_the_digits_configs_load_against_their_jobs(tmp_path):
    from longtail.config import dump_config, load_config
    from longtail.jobs.mine import MineConfig
    from longtail.models.tiny import TinyGeneratorConfig, size_multiple

    configs = Path(__file__).resolve().parent.parent / "configs" / "digits"
    mine = load_config(MineConfig, configs / "mine.yaml")
    dump_config(mine, tmp_path / "mine.yaml")
    assert load_config(MineConfig, tmp_path / "mine.yaml") == mine
    assert mine.conditions == ["none", "unguided", "ltg", "bestof@4"] and mine.seeds == [0, 1, 2]
    assert (mine.data.many, mine.data.few) == (50, 15) and not mine.finetune.hflip and not mine.base.hflip
    gen = load_config(TinyGeneratorConfig, configs / "generator.yaml")
    assert 16 % size_multiple(gen) == 0 and gen.unet_steps == 1500
