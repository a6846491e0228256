"""Every diffusers family through the jobs a user runs: `generate` (guided, a manifest) and `mine` (unguided and
LTG rounds, fine-tuning), from a local directory of tiny random components (``longtail.testing``), kind ``sd``."""

from __future__ import annotations

import csv

import pytest

from longtail import testing
from longtail.config import load_config
from longtail.jobs.generate import GenerateConfig, run_generate
from longtail.jobs.mine import MineConfig, run_mine
from test_mine import base_overrides, history, world  # noqa: F401  (world: the module's fixture)

WRITERS = {"sd3": testing.write_tiny_sd3, "flux": testing.write_tiny_flux, "sdxl": testing.write_tiny_sdxl,
           "pixart": testing.write_tiny_pixart, "sana": testing.write_tiny_sana}


@pytest.fixture(scope="module", params=sorted(WRITERS))
def family_dir(request, tmp_path_factory):
    return request.param, WRITERS[request.param](tmp_path_factory.mktemp(request.param) / "model")


def family_overrides(model) -> list[str]:
    return ["generator.kind=sd", f"generator.model={model}", "generator.num_steps=2", "generator.batch_size=2",
            "generator.cfg_scale=2.0"]


def test_generate_job_writes_a_guided_dataset_with_every_family(family_dir, world, tmp_path):  # noqa: F811
    name, model = family_dir
    cfg = load_config(GenerateConfig, overrides=[
        f"out={tmp_path / 'out'}", *family_overrides(model), "per_class=1", "device=cpu",
        "classifier.spec=longtail.train:make_classifier", f"classifier.checkpoint={world['root'] / 'clf.safetensors'}",
        "classifier.num_classes=3", "classifier.model_kwargs={width: 8, num_heads: 3}",
        "classifier.preprocess={size: 32, in_channels: 1}", f"classifier.class_names={world['root'] / 'names.txt'}",
        "guidance.signal=total", "guidance.weight=2.0", "generator_check.per_class=0"])
    (world["root"] / "names.txt").write_text("coat\nsandal\nbag\n")
    run_generate(cfg, show=False, log=lambda m: None)
    with (tmp_path / "out" / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["class_name"] for r in rows] == ["coat", "sandal", "bag"], name
    assert all(float(r["weight"]) == 2.0 and r["signal"] for r in rows), name


def test_mine_runs_unguided_and_ltg_rounds_with_every_family(family_dir, world, tmp_path):  # noqa: F811
    name, model = family_dir
    over = [*base_overrides(world, tmp_path / "run"), *family_overrides(model), "conditions=[unguided, ltg]",
            "schedule.epochs=2", "schedule.every=2", "schedule.per_round=3"]
    result = run_mine(load_config(MineConfig, overrides=over), show=False, log=lambda m: None)
    for condition in ("unguided", "ltg"):
        rounds = history(result, condition)
        assert [h["synthetic"] for h in rounds][-1] == 3, (name, condition)
        assert all(0 <= h["top1"] <= 1 for h in rounds), (name, condition)
