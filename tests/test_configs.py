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
