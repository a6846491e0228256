"""The CLI turns typed flags into one config layer: over ``--config``, under ``--set``; jobs are stubbed."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from longtail import cli, cli_generator
from longtail.config import ConfigError


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Replace the job functions the commands call; each records the config it was given."""
    import longtail.evaluation.run
    import longtail.jobs.calibrate
    import longtail.jobs.generate
    import longtail.jobs.mine

    seen: list[Any] = []
    monkeypatch.setattr(longtail.jobs.generate, "run_generate", lambda cfg, show=True: seen.append(cfg))
    monkeypatch.setattr(longtail.jobs.calibrate, "run_calibrate", lambda cfg, show=True: seen.append(cfg))
    monkeypatch.setattr(longtail.evaluation.run, "run_evaluate", lambda cfg: seen.append(cfg))
    monkeypatch.setattr(longtail.jobs.mine, "run_mine", lambda cfg, dry_run=False, show=True: seen.append(cfg))
    monkeypatch.setattr(longtail.jobs.mine, "run_introspect",
                        lambda run, overrides, show=True: seen.append((run, overrides)) or {"coat": ["p"]})
    return seen


def invoke(*args: str) -> Any:
    result = CliRunner().invoke(cli.app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def test_layer_nests_the_given_flags_over_a_mapping() -> None:
    under = {"seeds": [0], "mining": {"rounds": 1}}
    layer = cli._layer(under, seeds=[3], mining__finetune__lr=0.5, out=None)
    assert layer == {"seeds": [3], "mining": {"rounds": 1, "finetune": {"lr": 0.5}}}
    assert under == {"seeds": [0], "mining": {"rounds": 1}}  # not changed in place
    assert cli._split(" 1, 3 ,,10") == ["1", "3", "10"] and cli._split(None) is None


def test_generate_flags_are_typed_values(calls: list[Any], tmp_path) -> None:
    config = tmp_path / "g.yaml"
    config.write_text("per_class: 5\nseed: 9\nguidance:\n  weight: 2.0\n  signal: energy\n")
    invoke("generate", "--config", str(config), "--out", "o", "--sd", "sd-dir", "--weight", "3", "--steps", "2",
           "--per-class", "7", "--set", "guidance.weight=4", "--set", "chunk=2", "--no-progress")
    (cfg,) = calls
    assert cfg.out == "o" and cfg.generator.kind == "sd" and cfg.generator.model == "sd-dir"
    assert cfg.per_class == 7 and cfg.seed == 9 and cfg.generator.num_steps == 2 and cfg.chunk == 2
    assert cfg.guidance.weight == 4.0 and cfg.guidance.signal == "energy"  # --set over flags, flags over file


def test_calibrate_and_evaluate_lists(calls: list[Any]) -> None:
    invoke("calibrate", "--signals", "entropy,energy", "--weights", "1, 2.5", "--per-class", "1", "--no-progress")
    invoke("evaluate", "some/data", "--ensemble", "a.pt,b.pt", "--train", "tr", "--set", "many=50")
    cal, ev = calls
    assert cal.signals == ["entropy", "energy"] and cal.weights == [1.0, 2.5] and cal.per_class == 1
    assert all(type(w) is float for w in cal.weights)
    assert ev.data == "some/data" and ev.ensemble == ["a.pt", "b.pt"] and ev.train == "tr" and ev.many == 50


def test_bad_flag_values_name_the_key(calls: list[Any]) -> None:
    result = CliRunner().invoke(cli.app, ["calibrate", "--weights", "1,heavy"])
    assert isinstance(result.exception, ConfigError)
    assert str(result.exception) == "options: weights[1]: expected float, got 'heavy'"
    result = CliRunner().invoke(cli.app, ["generate", "--set", "guidance.wieght=3"])
    assert "override 'guidance.wieght=3': guidance.wieght: unknown key 'wieght' in guidance" in str(result.exception)
    assert calls == []


def test_main_prints_one_line_and_exits_2(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr("sys.argv", ["longtail", "generate", "--set", "per_class=many"])
    monkeypatch.delenv("LONGTAIL_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "longtail: error: override 'per_class=many': per_class: expected int, got 'many'\n"
    )



def test_demo_is_mine_on_configs_demo_yaml(calls: list[Any], tmp_path) -> None:
    from longtail.jobs.mine import load_demo_config

    invoke("demo", "--no-progress")
    invoke("demo", "--quick", "--seeds", "3,4", "--set", "schedule.per_round=7", "--no-progress")
    variant = tmp_path / "v.yaml"
    variant.write_text("out: runs/v\nbase: {ensemble: 2}\n")
    invoke("demo", "--config", str(variant), "--no-progress")
    full, quick, over = calls
    assert full == load_demo_config() and full.data.source == "fashion_mnist_lt"
    assert quick.seeds == [3, 4] and quick.out == "runs/demo-quick" and quick.schedule.per_round == 7
    assert quick.base.epochs == 12 and quick.sweep.signals == ["entropy", "total"]
    assert over.out == "runs/v" and over.base.ensemble == 2 and over.base.epochs == full.base.epochs


def test_introspect_takes_a_run_directory(calls: list[Any], tmp_path) -> None:
    invoke("introspect", str(tmp_path), "--captioner", "vlm:/models/blip", "--set", "introspection.pairs=4",
           "--no-progress")
    ((run, overrides),) = calls
    assert run == tmp_path and overrides == ["introspection.captioner=vlm:/models/blip", "introspection.pairs=4"]


def test_nuisance_rates_for_the_generator() -> None:
    from longtail.data.nuisance import DEFAULT_RATES

    assert cli_generator.parse_rates("default") == DEFAULT_RATES and cli_generator.parse_rates(None) is None
    assert cli_generator.parse_rates("rotate=0.05, invert=0.01") == {"rotate": 0.05, "invert": 0.01}
    with pytest.raises(ConfigError, match="unknown modes"):
        cli_generator.parse_rates("spin=0.1")
    with pytest.raises(ConfigError, match="not mode=rate"):
        cli_generator.parse_rates("rotate")


def test_model_is_the_family_agnostic_name_of_sd_and_mine_takes_an_embedded_generator(calls: list[Any]) -> None:
    invoke("generate", "--out", "o", "--model", "flux-dir", "--no-progress")
    invoke("calibrate", "--model", "sd3-dir", "--no-progress")
    invoke("mine", "--model", "sdxl-dir", "--no-progress")
    invoke("mine", "--generator", "runs/generator", "--no-progress")
    gen, cal, mine_sd, mine_embedded = calls
    assert (gen.generator.kind, gen.generator.model) == ("sd", "flux-dir")
    assert (cal.generator.kind, cal.generator.model) == ("sd", "sd3-dir")
    assert (mine_sd.generator.kind, mine_sd.generator.model) == ("sd", "sdxl-dir")
    assert (mine_embedded.generator.kind, mine_embedded.generator.model) == ("embedded", "runs/generator")


def test_a_command_missing_an_sd_extra_package_says_which_extra(monkeypatch, capsys) -> None:
    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'diffusers'", name="diffusers")

    monkeypatch.setattr(cli, "app", missing)
    with pytest.raises(SystemExit) as done:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and err == ("longtail: error: this command needs the [sd] extra (diffusers is not "
                                            "installed): pip install 'longtail[sd]'")

    def other(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'mypackage'", name="mypackage")

    monkeypatch.setattr(cli, "app", other)
    with pytest.raises(ModuleNotFoundError):  # not one of the extra's packages: the traceback, exit code 1
        cli.main()
