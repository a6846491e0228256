"""``longtail generate --shard i/n`` and ``longtail merge``: independent shards of one job list, folded into the
store an unsharded run makes; incomplete, undecodable or mismatched shards are reported, not merged."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from longtail import cli
from longtail.config import ConfigError, load_config
from longtail.data.store import SyntheticStore
from longtail.jobs.generate import GenerateConfig, run_generate
from longtail.jobs.merge import merge_parts
from longtail.jobs.shards import Shard, parse_shard, part_dir
from longtail.verify import verify

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# the shipped embedded generator (10 Fashion-MNIST classes, 28x28), unguided, 2 steps, one image per write
TINY = ["--steps", "2", "--weight", "0", "--device", "cpu", "--set", "generator_check.per_class=0", "--set",
        "chunk=1", "--batch-size", "1", "--no-progress"]


def config(out: Path, *extra: str) -> GenerateConfig:
    return load_config(GenerateConfig, overrides=[f"out={out}", "generator.num_steps=2", "guidance.weight=0",
                                                   "device=cpu", "generator_check.per_class=0", "chunk=1",
                                                   "generator.batch_size=1", *extra])


def manifest(root: Path) -> list[dict[str, str]]:
    with (root / "manifest.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def same_store(a: Path, b: Path) -> None:
    """The same ids, paths and image bytes (the seconds column differs run to run)."""
    ra, rb = manifest(a), manifest(b)
    assert [(r["id"], r["path"], r["seed"], r["prompt"]) for r in ra] == [
        (r["id"], r["path"], r["seed"], r["prompt"]) for r in rb]
    for row in ra:
        assert (a / row["path"]).read_bytes() == (b / row["path"]).read_bytes(), row["id"]


def test_shard_spec_from_flag_slurm_array_and_torchrun():
    assert parse_shard("1/3") == Shard(1, 3, "--shard") and parse_shard(None) is None and parse_shard("") is None
    slurm = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "3",
             "SLURM_ARRAY_TASK_STEP": "2", "RANK": "0", "WORLD_SIZE": "8"}  # --array=3-7:2 -> tasks 3, 5, 7
    assert parse_shard("auto", slurm) == Shard(2, 3, "SLURM array")  # the array wins over torchrun's variables
    assert parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4"}) == Shard(0, 4, "SLURM array")
    assert parse_shard("auto", {"RANK": "5", "WORLD_SIZE": "8"}) == Shard(5, 8, "torchrun")
    for bad, message in (("3/3", "0 <= i < n"), ("1-3", "must be i/n"), ("auto", "neither SLURM")):
        with pytest.raises(ConfigError, match=message):
            parse_shard(bad, {})
    with pytest.raises(ConfigError, match="not MIN"):
        parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "3",
                             "SLURM_ARRAY_TASK_STEP": "2"})
    jobs = list(range(10))  # the shards partition the job list
    taken = [Shard(k, 3).take(jobs) for k in range(3)]
    assert taken == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert part_dir("o", Shard(2, 3)) == Path("o/parts/shard-00002-of-00003")


def test_three_shard_processes_one_killed_and_rerun_merge_to_the_unsharded_store(tmp_path):
    out = tmp_path / "sharded"
    args = [sys.executable, "-m", "longtail", "generate", "--out", str(out), "--per-class", "2", *TINY]
    procs = {k: subprocess.Popen([*args, "--shard", f"{k}/3"], env=ENV, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE) for k in range(3)}
    killed = part_dir(out, Shard(1, 3)) / "manifest.csv"
    deadline = time.time() + 120
    while procs[1].poll() is None and time.time() < deadline:
        if killed.is_file() and len(manifest(killed.parent)) >= 2:
            break
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGKILL)
    for k, proc in procs.items():
        proc.wait(timeout=300)
        assert k == 1 or proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    made = len(SyntheticStore(killed.parent))  # the rows the store keeps (a row cut by the kill is not one)
    assert 2 <= made < 7, f"the kill landed after {made} of shard 1's 7 images"

    waiting = verify(out)
    assert f"{out}: shards waiting under parts/; when all are done: longtail merge {out}" in waiting.lines
    runner = CliRunner()
    first = runner.invoke(cli.app, ["merge", str(out)])
    assert first.exit_code == 1, (first.output, repr(first.exception))
    assert f"shard 1/3: {7 - made} of 7 images missing" in first.output and "shard 0/3" not in first.output
    assert not (out / "manifest.csv").exists() and (out / "parts").is_dir()  # nothing folded
    rerun = next(line for line in first.output.splitlines() if "re-run: " in line).split("re-run: ")[1]
    assert rerun == f"longtail generate --config {killed.parent / 'config.yaml'} --shard 1/3"
    done = subprocess.run([sys.executable, "-m", *rerun.split()], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{made} already there" in done.stdout

    second = runner.invoke(cli.app, ["merge", str(out)])
    assert second.exit_code == 0, second.output
    assert "3 shard(s) merged, 20 images (png); parts removed" in second.output
    assert not (out / "parts").exists() and not list(out.rglob("*.tmp"))

    reference = tmp_path / "unsharded"
    run_generate(config(reference, "per_class=2"), show=False, log=lambda m: None)
    same_store(out, reference)
    assert (out / "settings.json").read_text() == (reference / "settings.json").read_text()
    assert len(list(out.rglob("*.png"))) == 20
    again = runner.invoke(cli.app, ["merge", str(out)])  # nothing left to merge: one clear error
    assert again.exit_code != 0 and "no shards to merge" in str(again.exception)


def test_merge_refuses_parts_of_other_settings_naming_the_keys(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    run_generate(config(out, "per_class=1", "shard=0/2", "classes=[coat, bag]"), show=False, log=lambda m: None)
    run_generate(config(out, "per_class=1", "shard=1/2", "classes=[coat, bag]", "seed=5"), show=False,
                 log=lambda m: None)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(ConfigError, match=r"shard-00001-of-00002 was made with other settings than "
                                          r"shard-00000-of-00002 \(seed differ\)"):
        merge_parts(out, log=lambda m: None)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing changed
    monkeypatch.setattr(sys, "argv", ["longtail", "merge", str(out)])
    with pytest.raises(SystemExit) as ended:
        cli.main()
    stderr = capsys.readouterr().err
    assert ended.value.code == 2 and stderr.count("\n") == 1 and "(seed differ)" in stderr


def test_merge_names_every_plan_difference_at_once(tmp_path):
    import json

    from longtail.jobs.shards import SHARD_JSON

    out = tmp_path / "out"
    for k in range(2):
        run_generate(config(out, "per_class=1", f"shard={k}/2", "classes=[coat, bag]"), show=False,
                     log=lambda m: None)
    plan_file = part_dir(out, Shard(1, 2)) / SHARD_JSON
    plan = json.loads(plan_file.read_text())
    plan.update(num_shards=3, format="parquet")  # as if made by another kind of run
    plan_file.write_text(json.dumps(plan))
    with pytest.raises(ConfigError) as refused:
        merge_parts(out, log=lambda m: None)
    message = str(refused.value)
    assert "shard count (num_shards: 3 vs 2)" in message and "format (format: 'parquet' vs 'png')" in message


def test_an_undecodable_image_is_set_aside_reported_and_made_again(tmp_path):
    out = tmp_path / "out"
    for k in range(2):
        run_generate(config(out, "per_class=2", f"shard={k}/2", "classes=[coat, bag]"), show=False,
                     log=lambda m: None)
    image = part_dir(out, Shard(1, 2)) / "bag" / "c8_00001.png"  # the jobs: c4_0, c4_1, c8_0, c8_1 -> shard 1
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 2])  # cut: its row is intact, the file does not decode
    lines: list[str] = []
    result = merge_parts(out, log=lines.append)
    assert not result.ok and result.missing == {1: ["c8_00001"]}
    assert any("c8_00001.png: does not decode; set aside as c8_00001.png.damaged" in line for line in lines)
    run_generate(config(out, "per_class=2", "shard=1/2", "classes=[coat, bag]"), show=False, log=lambda m: None)
    assert merge_parts(out, log=lambda m: None).merged == 4
    assert (out / "bag" / "c8_00001.png").read_bytes() == good


def test_the_cluster_recipes_parse_and_use_real_generate_options():
    """scripts/cluster/*: valid bash, and every `longtail generate` option they pass exists."""
    import re as _re

    from longtail.cli import app

    options = CliRunner().invoke(app, ["generate", "--help"], terminal_width=200).output
    for script in sorted((Path(__file__).resolve().parents[1] / "scripts" / "cluster").iterdir()):
        subprocess.run(["bash", "-n", str(script)], check=True)
        line = next(x for x in script.read_text().splitlines() if "longtail generate" in x and not x.startswith("#"))
        for flag in _re.findall(r"(--[a-z][\w-]*)", line.split("longtail generate", 1)[1]):
            assert flag in options, (script.name, flag)
