from dataclasses import dataclass, field

import pytest

from longtail.config import ConfigError, dump_config, load_config


@dataclass
class Inner:
    epochs: int = 3
    lr: float = 1e-3
    names: list[str] = field(default_factory=lambda: ["a"])


@dataclass
class Outer:
    out: str = "runs/x"
    seeds: list[int] = field(default_factory=lambda: [0])
    weight: float | None = None
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seeds: [1, 2]\ninner:\n  epochs: 7\n")
    cfg = load_config(Outer, path, ["inner.lr=0.5", "weight=2", "flag=true", "inner.names=[x, y]"])
    assert cfg.seeds == [1, 2] and cfg.inner.epochs == 7 and cfg.inner.lr == 0.5
    assert cfg.weight == 2.0 and cfg.flag is True and cfg.inner.names == ["x", "y"]
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Outer, tmp_path / "resolved.yaml") == cfg


def test_base_layer_sits_under_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  epochs: 9\n")
    cfg = load_config(Outer, path, base={"inner": {"epochs": 1, "lr": 0.1}, "seeds": [5]})
    assert cfg.inner.epochs == 9 and cfg.inner.lr == 0.1 and cfg.seeds == [5]


@pytest.mark.parametrize(
    ("override", "message"),
    [("inner.epoch=3", "unknown key"), ("inner.epochs=abc", "expected int"), ("flag=maybe", "true/false"),
     ("novalue", "section.key=value"), ("inner.epochs=2.5", "integer")],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_top_layer_sits_over_the_file_and_under_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seeds: [1, 2]\ninner:\n  epochs: 9\n")
    cfg = load_config(Outer, path, ["inner.lr=0.5"], top={"seeds": [7], "inner": {"lr": 0.1, "epochs": 2}})
    assert cfg.seeds == [7] and cfg.inner.epochs == 2 and cfg.inner.lr == 0.5
