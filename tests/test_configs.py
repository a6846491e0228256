"""The YAML files in configs/ load, and configs/demo.yaml states exactly the demo's defaults."""

from pathlib import Path

import yaml

from longtail.config import load_config, to_dict
from longtail.demo import DemoConfig
from longtail.pipelines import CalibrateConfig, GenerateConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_demo_yaml_is_the_demo_defaults():
    assert yaml.safe_load((CONFIGS / "demo.yaml").read_text()) == to_dict(DemoConfig())
    assert load_config(DemoConfig, CONFIGS / "demo.yaml") == DemoConfig()


def test_example_configs_load():
    assert load_config(GenerateConfig, CONFIGS / "sd15_generate.yaml").generator.kind == "sd"
    assert load_config(CalibrateConfig, CONFIGS / "sd15_calibrate.yaml").weights


def test_mine_config_and_its_data_export(tmp_path, monkeypatch):
    import importlib.util

    from helpers import fake_fashion_mnist
    from longtail.data.datasets import FASHION_MNIST_CLASSES, longtail_counts
    from longtail.data.imagefolder import scan_imagefolder
    from longtail.mine_job import MineConfig

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
