from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from longtail.config import ConfigError, dump_config, from_dict, load_config, to_dict


@dataclass
class Finetune:
    epochs: int = 3
    lr: float = 1e-3
    names: list[str] = field(default_factory=lambda: ["a"])


@dataclass
class Outer:
    out: str = "runs/x"
    seeds: list[int] = field(default_factory=lambda: [0])
    weight: float | None = None
    flag: bool = False
    tags: list[str] | None = None
    extra: dict = field(default_factory=dict)
    preprocess: dict | None = None
    channels: tuple[int, ...] = (4, 8)
    finetune: Finetune = field(default_factory=Finetune)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seeds: [1, 2]\nfinetune:\n  epochs: 7\n")
    cfg = load_config(Outer, path, ["finetune.lr=0.5", "weight=2", "flag=true", "finetune.names=[x, y]"])
    assert cfg.seeds == [1, 2] and cfg.finetune.epochs == 7 and cfg.finetune.lr == 0.5
    assert cfg.weight == 2.0 and isinstance(cfg.weight, float) and cfg.flag is True
    assert cfg.finetune.names == ["x", "y"]
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Outer, tmp_path / "resolved.yaml") == cfg


def test_typed_fields_round_trip(tmp_path):
    cfg = load_config(Outer, overrides=["tags=[a, b]", "extra={k: [1, 2], nested: {x: 1}}", "preprocess={size: 8}",
                                        "channels=[2, 4, 6]", "finetune.lr=1", "out=2024", "finetune.lr=1e-4"])
    assert cfg.tags == ["a", "b"] and cfg.extra == {"k": [1, 2], "nested": {"x": 1}}
    assert cfg.preprocess == {"size": 8} and cfg.channels == (2, 4, 6) and isinstance(cfg.channels, tuple)
    assert cfg.finetune.lr == 1e-4 and isinstance(cfg.finetune.lr, float) and cfg.out == "2024"
    assert to_dict(cfg)["channels"] == [2, 4, 6]
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Outer, tmp_path / "resolved.yaml") == cfg
    assert load_config(Outer, overrides=["weight=null", "tags=null"]) == Outer()


def test_ints_are_accepted_for_floats():
    cfg = from_dict(Outer, {"weight": 3, "finetune": {"lr": 1}})
    assert cfg.weight == 3.0 and cfg.finetune.lr == 1.0 and type(cfg.finetune.lr) is float
    assert cfg.finetune.epochs == 3  # the rest of a section keeps its defaults


def test_base_layer_sits_under_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  epochs: 9\n")
    cfg = load_config(Outer, path, base={"finetune": {"epochs": 1, "lr": 0.1}, "seeds": [5]})
    assert cfg.finetune.epochs == 9 and cfg.finetune.lr == 0.1 and cfg.seeds == [5]


def test_top_layer_sits_over_the_file_and_under_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seeds: [1, 2]\nfinetune:\n  epochs: 9\n")
    cfg = load_config(Outer, path, ["finetune.lr=0.5"], top={"seeds": [7], "finetune": {"lr": 0.1, "epochs": 2}})
    assert cfg.seeds == [7] and cfg.finetune.epochs == 2 and cfg.finetune.lr == 0.5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("finetune.epoch=3", "override 'finetune.epoch=3': finetune.epoch: unknown key 'epoch' in finetune "
                             "(known: epochs, lr, names)"),
        ("nope=1", "nope: unknown key 'nope' in the top level (known: out, seeds, "),
        ("finetune.lr=abc", "override 'finetune.lr=abc': finetune.lr: expected float, got 'abc'"),
        ("finetune.epochs=abc", "finetune.epochs: expected int, got 'abc'"),
        ("finetune.epochs=2.5", "finetune.epochs: expected int, got 2.5"),
        ("flag=maybe", "flag: expected bool, got 'maybe'"),
        ("weight=heavy", "weight: expected float | None, got 'heavy'"),
        ("seeds=[1, x]", "seeds[1]: expected int, got 'x'"),
        ("seeds=0,1", "seeds: expected list[int], got '0,1'"),
        ("finetune.names=x", "finetune.names: expected list[str], got 'x'"),
        ("finetune=3", "finetune: expected a mapping (Finetune), got 3"),
        ("out=[1]", "out: expected str, got [1]"),
        ("novalue", "override 'novalue' must look like section.key=value"),
        ("a..b=1", "must look like section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(Outer, None, [override])
    assert message in str(info.value)


def test_errors_name_the_layer(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"^config file .*c\.yaml: finetune\.lr: expected float, got 'fast'$"):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match=r"^options: finetune\.zz: unknown key 'zz' in finetune"):
        load_config(Outer, top={"finetune": {"zz": 1}})
    with pytest.raises(ConfigError, match=r"^base config: flag: expected bool, got 'often'$"):
        load_config(Outer, base={"flag": "often"})
    with pytest.raises(ConfigError, match=r"^where: finetune\.epochs: expected int, got 'x'$"):
        from_dict(Outer, {"finetune": {"epochs": "x"}}, where="where")
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Outer, path)
    path.write_text("seeds: [1\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(Outer, path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_an_override_replaces_a_mapping_value_and_merges_a_section(tmp_path):
    from longtail.jobs.mine import MineConfig

    path = tmp_path / "c.yaml"
    path.write_text("classifier: {spec: resnet18, model_kwargs: {width: 8, num_heads: 3}}\nbase: {epochs: 4}\n")
    cfg = load_config(MineConfig, path, ["classifier.model_kwargs={}", "base={lr: 0.5}"])
    assert cfg.classifier.model_kwargs == {} and cfg.classifier.spec == "resnet18"
    assert (cfg.base.epochs, cfg.base.lr) == (4, 0.5)
    cfg = load_config(MineConfig, path, ["classifier.model_kwargs={depth: 2}"])
    assert cfg.classifier.model_kwargs == {"depth": 2}
