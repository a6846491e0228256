"""The YAML files in configs/ load against their job's config, round-trip, and errors name the key."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from longtail.config import ConfigError, dump_config, load_config
from longtail.jobs.calibrate import CalibrateConfig
from longtail.jobs.generate import GenerateConfig
from longtail.jobs.mine import MineConfig, load_demo_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MINE_CONFIGS = ["demo.yaml", "compare.yaml", "fmnist_mine.yaml", "clean.yaml", "study/val_recipe.yaml",
                "study/confirm.yaml", "study/efficiency.yaml", *(f"paper/{p.name}" for p in sorted((CONFIGS / "paper").glob("*.yaml")))]


@pytest.mark.parametrize("name", MINE_CONFIGS)
def test_mine_configs_load_and_round_trip(name, tmp_path):
    cfg = load_config(MineConfig, CONFIGS / name)
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(MineConfig, tmp_path / "resolved.yaml") == cfg


def test_demo_config_is_configs_demo_yaml():
    assert load_demo_config() == load_config(MineConfig, CONFIGS / "demo.yaml")


def test_errors_name_the_section_and_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^override 'finetune\.lr=abc': finetune\.lr: expected float, got 'abc'$"):
        load_config(MineConfig, CONFIGS / "demo.yaml", ["finetune.lr=abc"])
    (tmp_path / "c.yaml").write_text("schedule:\n  evry: 2\n")
    with pytest.raises(ConfigError, match=r"^config file .*c\.yaml: schedule\.evry: unknown key 'evry' in "
                                          r"schedule \(known: epochs, generate_at, every, "):
        load_config(MineConfig, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"sd15_generate\.yaml: per_class: unknown key 'per_class' in the top level"):
        load_config(MineConfig, CONFIGS / "sd15_generate.yaml")  # a generate config is no mine config
    cfg = load_config(MineConfig, CONFIGS / "demo.yaml", ["finetune.lr=1"])  # an int for a float
    assert cfg.finetune.lr == 1.0 and type(cfg.finetune.lr) is float


def test_example_configs_load():
    assert load_config(GenerateConfig, CONFIGS / "sd15_generate.yaml").generator.kind == "sd"
    assert load_config(CalibrateConfig, CONFIGS / "sd15_calibrate.yaml").weights


def test_mine_config_and_its_data_export(tmp_path, monkeypatch):
    import importlib.util

    from helpers import fake_fashion_mnist
    from longtail.data.datasets import FASHION_MNIST_CLASSES, longtail_counts
    from longtail.data.imagefolder import scan_imagefolder

    cfg = load_config(MineConfig, CONFIGS / "fmnist_mine.yaml")
    assert cfg.conditions == ["none", "unguided", "ltg"] and cfg.data.train == "runs/fmnist_if/train"
    monkeypatch.setenv("LONGTAIL_FASHION_MNIST_DIR", str(fake_fashion_mnist(tmp_path / "idx")))
    spec = importlib.util.spec_from_file_location("export", CONFIGS.parent / "scripts" / "fashion_imagefolder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    counts = longtail_counts(20, 10)
    assert module.export(tmp_path / "if", val=20, n_max=20, imbalance=10) == sum(counts) + 20
    train = scan_imagefolder(tmp_path / "if" / "train")
    assert train.class_names == sorted(FASHION_MNIST_CLASSES)
    assert [train.labels.count(train.class_names.index(c)) for c in FASHION_MNIST_CLASSES] == counts
    assert len(scan_imagefolder(tmp_path / "if" / "val").paths) == 20
    assert module.export(tmp_path / "if", val=20, n_max=20, imbalance=10) == 0  # existing files are kept
    # the clean export is the raw images, padded to 32 px: the [-1, 1] round trip is exact on 8-bit images
    from longtail.data.datasets import load_fashion_mnist, longtail_indices
    from longtail.data.sources import FashionMNISTLT

    clean = FashionMNISTLT(n_max=20, imbalance=10)
    raw, labels = load_fashion_mnist("train")
    idx = longtail_indices(labels, counts, 0)
    for i, path in enumerate(_pngs(tmp_path / "if" / "train", clean)):
        saved = np.asarray(Image.open(path))
        assert saved.shape == (32, 32) and np.array_equal(saved[2:30, 2:30], raw[idx[i]].numpy()), path
    # with rare modes (the demo's data, here invert at 50%): exactly the images given a mode differ
    assert module.demo_nuisance() == load_demo_config().data.nuisance
    module.export(tmp_path / "nu", val=0, n_max=20, imbalance=10, nuisance={"invert": 0.5})
    modes = FashionMNISTLT(n_max=20, imbalance=10, nuisance={"invert": 0.5}).train_modes
    changed = [not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
               for a, b in zip(_pngs(tmp_path / "if" / "train", clean), _pngs(tmp_path / "nu" / "train", clean),
                               strict=True)]
    assert changed == (modes > 0).tolist() and 0 < sum(changed) < len(changed)


def test_studies_of_the_clean_testbed_keep_their_testbed():
    """The demo moved to the nuisance testbed; configs that ran on the clean one pin it."""
    demo = load_demo_config()
    assert demo.generator.model == "nuisance" and demo.data.nuisance
    for name in ("clean.yaml", "compare.yaml", "study/val_recipe.yaml", "study/confirm.yaml"):
        cfg = load_demo_config(CONFIGS / name)
        assert cfg.generator.model == "clean" and not cfg.data.nuisance and not cfg.data.nuisance_eval, name
        assert not cfg.sweep.options and not cfg.introspection.enabled, name
    assert load_demo_config(CONFIGS / "study/val_recipe.yaml").data.eval_split == "val"


def _pngs(root, source) -> list:
    """The exported training PNGs in the source's order (``<class>/<i>.png``, i counting over all images)."""
    from longtail.data.datasets import FASHION_MNIST_CLASSES

    return [root / FASHION_MNIST_CLASSES[label] / f"{i}.png" for i, label in enumerate(source.train_y.tolist())]
