"""`--json` on the commands that print tables (one strict JSON object on stdout, log lines on stderr) and the exit
codes the top-level help documents (0 ok, 2 bad input, 1 failure)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from longtail import cli
from longtail.jobs.common import write_classifier_json
from longtail.train import SmallCNN
from test_heads_cli import CLASSES, write_folder

SPEC = "longtail.train:SmallCNN"
TABLE_COMMANDS = (("evaluate",), ("heads", "overhead"), ("heads", "train"), ("calibrate",), ("mine",), ("demo",))


def strict(text: str) -> Any:
    """``json.loads`` that refuses NaN / Infinity (RFC 8259), as any strict parser does."""

    def reject(token: str) -> None:
        raise ValueError(f"non-standard JSON constant {token!r} in the output")

    return json.loads(text, parse_constant=reject)


def invoke(*args: str):
    """The command through typer's runner; stdout and stderr apart (click >= 8.2)."""
    result = CliRunner().invoke(cli.app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A random SmallCNN described by a classifier.json; a long-tailed training folder (6 / 3 / 1 images: Many,
    Medium, Few with ``many=5, few=2``) and an evaluation folder without "coat" (its accuracy is undefined)."""
    root = tmp_path_factory.mktemp("cli_json")
    torch.manual_seed(0)
    save_file(SmallCNN(1, len(CLASSES), width=8).state_dict(), str(root / "clf.safetensors"))
    write_classifier_json(root / "described", SPEC, str(root / "clf.safetensors"),
                          model_kwargs={"in_channels": 1, "width": 8}, num_classes=3, class_names=list(CLASSES),
                          preprocess={"size": 16, "in_channels": 1})
    train = root / "train"
    for name, n in zip(CLASSES, (6, 3, 1), strict=True):
        write_folder(train, n, seed=0, classes=(name,))
    return {"root": root, "json": root / "described" / "classifier.json", "train": train,
            "eval": write_folder(root / "eval", 4, seed=1, classes=("bag", "sandal")),
            "val": write_folder(root / "val", 3, seed=2)}


def test_evaluate_json_is_the_report_on_stdout_and_the_table_goes_to_stderr(world, tmp_path):
    args = ["evaluate", str(world["eval"]), "--classifier", str(world["json"]), "--train", str(world["train"]),
            "--set", "many=5", "--set", "few=2", "--set", "device=cpu"]
    as_json = invoke(*args, "--json", "--out", str(tmp_path / "ev"))
    report = strict(as_json.stdout)  # the whole of stdout is one JSON object
    assert report == strict((tmp_path / "ev" / "evaluate.json").read_text())  # the data evaluate.json holds
    assert report["n"] == 8 and report["missing_classes"] == ["coat"] and report["class_names"] == list(CLASSES)
    assert report["groups"] == ["many", "medium", "few"]
    assert report["accuracy"]["medium"] is None  # no "coat" images: undefined, null rather than NaN
    assert set(report["detection"]) >= {"entropy", "energy"}
    assert "AUROC rare" in as_json.stderr and "AUROC rare" not in as_json.stdout

    table = invoke(*args)  # without --json the table is on stdout, as before
    assert "AUROC rare" in table.stdout
    top1 = re.search(r"top-1 ([0-9.]+)", table.stdout).group(1)
    assert float(top1) == pytest.approx(report["accuracy"]["top1"], abs=5e-5)
    for name, entry in report["detection"].items():
        row = re.search(rf"^{name}\s+(\S+)", table.stdout, re.M).group(1)
        assert (row == "n/a") if entry["auroc_rare"] is None else float(row) == pytest.approx(entry["auroc_rare"],
                                                                                            abs=5e-4)


def test_heads_overhead_json_holds_the_parameter_table():
    args = ["heads", "overhead", "--arch", "resnet18", "--num-classes", "10", "--heads", "5", "--no-time"]
    result = strict(invoke(*args, "--json").stdout)
    assert result["arch"] == "resnet18" and result["num_heads"] == 5
    assert result["time"] is None and result["time_setup"] is None
    params = result["params"]
    assert params["added_params"] == 5 * 512 * 10 and params["num_classes"] == 10 and params["d_model"] == 512
    table = invoke(*args).stdout
    assert f"base parameters:  {params['base_params']:,}" in table
    assert table.strip().splitlines()[-1] == f"overhead: {params['percent']:.2f}%"


def test_heads_overhead_json_with_time():
    result = invoke("heads", "overhead", "--arch", SPEC, "--num-classes", "3", "--heads", "3", "--image-size", "8",
                    "--batch-size", "2", "--repeats", "1", "--device", "cpu", "--json")
    parsed = strict(result.stdout)
    assert set(parsed["time"]) == {f"{k}_{m}" for k in ("forward", "backward") for m in ("base_ms", "heads_ms",
                                                                                          "ratio")}
    assert all(v > 0 for v in parsed["time"].values())
    assert parsed["time_setup"] == {"batch_size": 2, "input_shape": [1, 8, 8], "device": "cpu", "repeats": 1,
                                    "warmup": 1}
    assert "forward+backward" in result.stderr  # the table, on stderr


def test_heads_train_json_holds_the_detection_report(world, tmp_path):
    out = tmp_path / "heads"
    result = invoke("heads", "train", "--classifier", str(world["json"]), "--data", str(world["train"]),
                    "--val", str(world["val"]), "--out", str(out), "--num-heads", "2", "--epochs", "1",
                    "--batch-size", "4", "--device", "cpu", "--no-progress", "--json")
    parsed = strict(result.stdout)
    assert parsed["heads"] == str(out / "heads.safetensors") and parsed["classifier"] == str(out / "classifier.json")
    assert parsed["report"] == strict((out / "report.json").read_text())
    assert "AUROC hard" in result.stderr and "AUROC hard" not in result.stdout


@pytest.mark.parametrize("command", [" ".join(c) for c in TABLE_COMMANDS])
def test_every_command_that_prints_a_table_takes_json(command):
    import typer.main

    node = typer.main.get_command(cli.app)
    for name in command.split():
        node = node.commands[name]
    assert "--json" in {opt for param in node.params for opt in getattr(param, "opts", [])}


@pytest.fixture
def noisy_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stub jobs that print a table line (with print, as the jobs' default ``log`` does) and return a result
    holding a NaN and a numpy scalar."""
    import longtail.jobs.calibrate
    import longtail.jobs.mine

    def job(name: str):
        def run(cfg, dry_run: bool = False, show: bool = True) -> dict:
            print(f"{name} table line")
            return {"job": name, "dry_run": dry_run, "undefined": float("nan"), "n": np.int64(3)}

        return run

    monkeypatch.setattr(longtail.jobs.calibrate, "run_calibrate", job("calibrate"))
    monkeypatch.setattr(longtail.jobs.mine, "run_mine", job("mine"))


@pytest.mark.parametrize("args", [["calibrate"], ["mine", "--dry-run"], ["demo"]], ids=lambda a: a[0])
def test_json_of_calibrate_mine_and_demo_is_strict_and_alone_on_stdout(noisy_jobs, args):
    result = invoke(*args, "--no-progress", "--json")
    parsed = strict(result.stdout)
    name = "calibrate" if args[0] == "calibrate" else "mine"
    assert parsed == {"job": name, "dry_run": args[-1] == "--dry-run", "undefined": None, "n": 3}
    assert result.stderr == f"{name} table line\n"
    plain = invoke(*args, "--no-progress")
    assert plain.stdout == f"{name} table line\n"


# --- exit codes ------------------------------------------------------------------------------------------------


def test_top_level_help_documents_the_exit_codes():
    text = " ".join(invoke("--help").stdout.split())
    assert "Exit codes: 0 ok; 2 bad input (" in text and "); 1 failure (anything else" in text
    assert cli.EXIT_CODES in cli.app.info.help


def longtail(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m longtail ARGS`` in a fresh process (the entry point's exit code, not the runner's), or
    ``code`` before ``longtail.cli.main()`` with ``sys.argv`` set to ARGS."""
    program = f"import sys\n{code or ''}\nfrom longtail.cli import main\nsys.argv = ['longtail', *{list(args)!r}]\nmain()"
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "LONGTAIL_DEBUG"})


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["table", "json"])
def test_bad_input_exits_2_with_one_line(json_flag):
    done = longtail("heads", "overhead", "--heads", "1", "--no-time", *json_flag)
    assert done.returncode == 2, done.stderr
    assert done.stderr == "longtail: error: --heads must be at least 2, got 1\n" and done.stdout == ""


def test_a_usage_error_exits_2():
    done = longtail("evaluate", "--no-such-option")
    assert done.returncode == 2 and "No such option" in done.stderr and done.stdout == ""


def test_an_internal_failure_exits_1_with_its_traceback():
    boom = ("import longtail.jobs.heads as jobs\n"
            "def boom(*args, **kwargs):\n    print('half a table')\n    raise RuntimeError('boom')\n"
            "jobs.run_heads_overhead = boom")
    done = longtail("heads", "overhead", "--no-time", "--json", code=boom)
    assert done.returncode == 1, done.stderr
    assert "Traceback" in done.stderr and done.stderr.rstrip().endswith("RuntimeError: boom")
    assert done.stdout == ""  # with --json even a failed job's output stays off stdout
    assert "half a table" in done.stderr
