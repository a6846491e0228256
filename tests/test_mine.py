"""`longtail mine` on small ImageFolders: end to end, resume after kills, bad inputs, paper configs, accelerate,
the base-training and introspection stages, the comparison over conditions and seeds."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import chromium_dom
from longtail.config import ConfigError, load_config
from longtail.data.datasets import DataError
from longtail.heads import EpistemicClassifier
from longtail.jobs.mine import MineConfig, generation_epochs, run_mine
from longtail.testing import tiny_generator, write_tiny_stable_diffusion

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CLASSES = ("coat", "sandal", "bag")
REPO = Path(__file__).resolve().parent.parent

NO_BN_MODEL = '''
import torch
def build(num_classes=3, in_channels=1):
    return torch.nn.Sequential(torch.nn.Conv2d(in_channels, 6, 3, stride=2), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, num_classes))
'''


def write_folder(root: Path, per_class: int, mode: str = "L", seed: int = 0) -> Path:
    """Class-dependent blobs as PNG (grayscale or a colour variant)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.zeros((28, 28), np.uint8)
            size = 6 + 5 * c
            y, x = rng.integers(0, 28 - size, 2)
            img[y : y + size, x : x + size] = 200
            if mode == "RGB":
                img = np.stack([img, img // 2, 255 - img], -1)
            Image.fromarray(img, mode).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mine")
    train, val = write_folder(root / "train", 8), write_folder(root / "val", 4, seed=1)
    (root / "model.py").write_text(NO_BN_MODEL)
    namespace: dict = {}
    exec(NO_BN_MODEL, namespace)
    torch.manual_seed(0)
    save_file(namespace["build"]().state_dict(), str(root / "nobn.safetensors"))
    torch.manual_seed(0)
    from longtail.train import make_classifier

    save_file(make_classifier(3, width=8, num_heads=3).state_dict(), str(root / "clf.safetensors"))
    return {"root": root, "train": train, "val": val, "gen": tiny_generator(root / "gen")}


def base_overrides(world, out: Path) -> list[str]:
    return [f"out={out}", f"data.train={world['train']}", f"data.val={world['val']}",
            "classifier.spec=longtail.train:make_classifier", f"classifier.checkpoint={world['root'] / 'clf.safetensors'}",
            "classifier.num_classes=3", "classifier.model_kwargs={width: 8, num_heads: 3}",
            "classifier.preprocess={size: 32, in_channels: 1}", "generator.kind=embedded", f"generator.model={world['gen']}",
            "generator.num_steps=2", "generator.cfg_scale=2.0", "generator.batch_size=2", "guidance.signal=total",
            "guidance.weight=1.0", "schedule.epochs=4", "schedule.every=2", "schedule.per_round=6",
            "schedule.allocation=even", "finetune.batch_size=8", "finetune.num_workers=0", "device=cpu",
            "generator_check.per_class=0"]  # a random-weight generator draws no class (test_generator_check.py)


def mining_dir(run: Path, cond: str = "ltg", seed: int = 0) -> Path:
    return run / f"seed_{seed}" / "mining" / cond


def manifest(run: Path, cond: str = "ltg", seed: int = 0) -> list[dict]:
    with (mining_dir(run, cond, seed) / "synthetic" / "manifest.csv").open() as f:
        return list(csv.DictReader(f))


def history(result: dict, cond: str = "ltg", seed: int = 0) -> list[dict]:
    return result["per_seed"][str(seed)]["mining"][cond]


def test_schedule_forms():
    from longtail.jobs.mine import ScheduleSpec

    assert generation_epochs(ScheduleSpec(epochs=100, every=5)) == list(range(0, 100, 5))
    assert generation_epochs(ScheduleSpec(epochs=10, every=2, until=5)) == [0, 2, 4]
    with pytest.raises(ConfigError, match="generate_at"):
        generation_epochs(ScheduleSpec(epochs=10, generate_at=[0, 12]))


def test_mini_mining_run_end_to_end(world, tmp_path):
    out = tmp_path / "run"
    result = run_mine(load_config(MineConfig, overrides=base_overrides(world, out)), show=False, log=lambda m: None)
    rows_by_round = history(result)
    assert [h["round"] for h in rows_by_round] == [0, 1, 2] and [h["synthetic"] for h in rows_by_round] == [0, 6, 12]
    assert all(0 <= h["top1"] <= 1 for h in rows_by_round) and "detection" in rows_by_round[-1]
    rows = manifest(out)
    assert len(rows) == 12 == len({r["id"] for r in rows}) and {r["class_name"] for r in rows} == set(CLASSES)
    assert {float(r["weight"]) for r in rows} == {1.0} and {r["vae_dtype"] for r in rows} == {"float32"}
    for name in ("config.yaml", "plan.json", "metrics.json", "summary.txt", "report.html", "seed_0/base/metrics.json",
                 "seed_0/base/classifier.json", "seed_0/mining/ltg/round_2/classifier.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(result))
    # the same directory with another weight would relabel old images: refused, naming what differs
    with pytest.raises(ConfigError, match=r"other settings \(guidance\.weight: 1\.0 -> 5\.0; the run's are in "):
        run_mine(load_config(MineConfig, overrides=[*base_overrides(world, out), "guidance.weight=5"]), show=False,
                 log=lambda m: None)
    dom = chromium_dom(out / "report.html", tmp_path / "profile")
    if dom is not None:  # the run's own report, rendered: its mining sections are there
        assert '<section id="rounds">' in dom and '<section id="synthetic">' in dom
    # `longtail introspect RUN` on the finished run: its classifier, its weight, its generator
    from longtail.jobs.mine import run_introspect

    prompts = run_introspect(out, ["introspection.images_per_class=2", "introspection.pairs=2"], show=False,
                             log=lambda m: None)
    assert set(prompts) == set(CLASSES) and (out / "introspection" / "class_keywords.json").is_file()
    assert json.loads((out / "introspection" / "prompts.json").read_text()) == prompts
    with pytest.raises(ConfigError, match="not a run directory"):
        run_introspect(tmp_path / "nowhere", show=False, log=lambda m: None)


def test_colour_data_and_heads_trained_on_request(world, tmp_path):
    train, val = write_folder(tmp_path / "train", 6, "RGB"), write_folder(tmp_path / "val", 3, "RGB", seed=2)
    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet", num_classes=3).state_dict(), str(tmp_path / "c.safetensors"))
    over = [*base_overrides(world, tmp_path / "run"), f"data.train={train}", f"data.val={val}",
            "classifier.spec=timm:test_resnet", f"classifier.checkpoint={tmp_path / 'c.safetensors'}",
            "classifier.model_kwargs={}", "classifier.preprocess={size: 32}",
            "heads.epochs=1", "schedule.epochs=2"]
    result = run_mine(load_config(MineConfig, overrides=over), show=False, log=lambda m: None)
    assert (tmp_path / "run" / "seed_0" / "base" / "heads.safetensors").is_file()
    assert history(result)[-1]["synthetic"] == 6


@pytest.mark.parametrize("problem", ["missing class", "empty class", "corrupt png", "class mismatch"])
def test_bad_inputs_name_the_problem(world, tmp_path, problem):
    train = write_folder(tmp_path / "train", 3)
    over = [*base_overrides(world, tmp_path / "run"), f"data.train={train}"]
    if problem == "missing class":
        for p in (train / "bag").iterdir():
            p.unlink()
        (train / "bag").rmdir()
        expect = (ConfigError, r"3 outputs but .* has 2 classes")
    elif problem == "empty class":
        for p in (train / "bag").iterdir():
            p.unlink()
        expect = (DataError, r"bag holds no images")
    elif problem == "corrupt png":
        (train / "coat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        expect = (DataError, r"bad\.png: unreadable image")
    else:
        (tmp_path / "names.txt").write_text("coat\nsandal\nshoe\n")
        over.append(f"data.class_names={tmp_path / 'names.txt'}")
        expect = (DataError, r"missing folders \['shoe'\]")
    with pytest.raises(expect[0], match=expect[1]):
        run_mine(load_config(MineConfig, overrides=over), dry_run=True, show=False, log=lambda m: None)


def test_resume_after_kills_at_several_points(world, tmp_path):
    out = tmp_path / "run"
    over = [*base_overrides(world, out), "schedule.epochs=6", "schedule.per_round=12"]
    args = [sys.executable, "-m", "longtail", "mine", "--no-progress"]
    for item in over:
        args += ["--set", item]
    evidence = []
    for point in ("synthetic row", "round 1 done", "round 2 rows"):
        proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 180
        while proc.poll() is None and time.time() < deadline:
            rows = manifest(out) if (mining_dir(out) / "synthetic" / "manifest.csv").is_file() else []
            if ((point == "synthetic row" and rows)
                    or (point == "round 1 done" and (mining_dir(out) / "round_1" / "metrics.json").is_file())
                    or (point == "round 2 rows" and any(r["round"] == "2" for r in rows))):
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        evidence.append((point, len(manifest(out)) if (mining_dir(out) / "synthetic" / "manifest.csv").is_file() else 0))
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = manifest(out)
    print("resume evidence (kill point, manifest rows at kill):", evidence, "final rows:", len(rows))
    assert len(rows) == 36 == len({r["id"] for r in rows}), evidence
    rounds = history(json.loads((out / "metrics.json").read_text()))
    assert [h["synthetic"] for h in rounds] == [0, 12, 24, 36]


@pytest.mark.slow
def test_finetuning_under_accelerate_matches_one_process(world, tmp_path):
    """2 data-parallel processes (split batches) == 1 process, up to floating-point order (a model without BN)."""
    results = {}
    for n in (1, 2):
        out = tmp_path / f"run{n}"
        over = [*base_overrides(world, out), f"classifier.spec={world['root'] / 'model.py'}:build",
                f"classifier.checkpoint={world['root'] / 'nobn.safetensors'}", "classifier.model_kwargs={}",
                "guidance.weight=0",
                "finetune.crop=center", "finetune.rotation=0", "finetune.hflip=false", "schedule.per_round=6",
                # batches that split evenly over 2 processes (24 + 6 + 6 images), and per-image generation
                "finetune.batch_size=6", "generator.batch_size=1"]
        args = ["-m", "longtail", "mine", "--no-progress"]
        for item in over:
            args += ["--set", item]
        if n == 1:
            cmd = [sys.executable, *args]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
        done = subprocess.run(cmd, env={**ENV, "PYTHONHASHSEED": "0"}, capture_output=True, text=True, timeout=400,
                              cwd=REPO)
        assert done.returncode == 0, done.stderr[-3000:]
        results[n] = out
    from safetensors.torch import load_file

    a = load_file(str(mining_dir(results[1]) / "round_2" / "classifier.safetensors"))
    b = load_file(str(mining_dir(results[2]) / "round_2" / "classifier.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_paper_configs_dry_run(world, tmp_path):
    configs = sorted((REPO / "configs" / "paper").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        with pytest.raises(ConfigError, match="not there"):
            run_mine(load_config(MineConfig, path), dry_run=True, show=False, log=lambda m: None)
    sd = write_tiny_stable_diffusion(tmp_path / "sd")
    train, val = write_folder(tmp_path / "train", 4, "RGB"), write_folder(tmp_path / "val", 2, "RGB", seed=3)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    save_file(model.state_dict(), str(tmp_path / "c.safetensors"))
    EpistemicClassifier(model, num_heads=5).save_heads(tmp_path / "h.safetensors")
    for path in configs:
        lines = []
        over = [f"data.train={train}", f"data.val={val}", "classifier.spec=timm:test_resnet",
                f"classifier.checkpoint={tmp_path / 'c.safetensors'}", "classifier.num_classes=3",
                f"classifier.heads={tmp_path / 'h.safetensors'}", f"generator.model={sd}", "generator.dtype=fp32",
                "generator.height=32", "generator.width=32", "device=cpu"]
        result = run_mine(load_config(MineConfig, path, over), dry_run=True, show=False, log=lines.append)
        text = "\n".join(lines)
        assert "round" in text and "estimated generation time" in text, path
        assert "run directory: " in text and "stages: base classifier" in text, path
        assert result["estimate"]["seconds_per_image"] > 0


def test_comparison_over_conditions_and_seeds(world, tmp_path):
    out = tmp_path / "cmp"
    over = [*base_overrides(world, out), "schedule.epochs=2", "schedule.per_round=3", "seeds=[0, 1]",
            "conditions=[none, unguided, ltg, 'ltg:entropy@2', gif, naive, 'aug:cutmix', 'aug:randaugment']"]
    lines = []
    result = run_mine(load_config(MineConfig, overrides=over), show=False, log=lines.append)
    table = result["conditions"]
    assert list(table) == ["none", "unguided", "ltg", "ltg:entropy@2", "gif", "naive", "aug:cutmix", "aug:randaugment"]
    for cond in table:
        expected = 0 if cond in ("none", "aug:cutmix", "aug:randaugment") else 3
        assert [history(result, cond, s)[-1]["synthetic"] for s in (0, 1)] == [expected, expected], cond
        assert table[cond]["few"]["n"] == 2
    assert (out / "metrics.json").is_file() and "+ LTG (entropy, w=2)" in "\n".join(lines)
    gif_rows = manifest(out, "gif")
    assert all(r["prompt"].startswith("a ") and " of a" in r["prompt"] for r in gif_rows)
    assert {float(r["weight"]) for r in manifest(out, "ltg_entropy_w2", seed=1)} == {2.0}
    assert {float(r["weight"]) for r in manifest(out, "unguided", seed=1)} == {0.0}
    # paired differences to unguided, per seed, for every other condition
    paired = result["paired"]["table"]
    assert "unguided" not in paired and set(paired) == set(table) - {"unguided"}
    ltg = paired["ltg"]["few"]
    assert ltg["n"] == 2 and ltg["wins"] + ltg["losses"] + ltg["ties"] == 2
    assert ltg["mean"] == pytest.approx(table["ltg"]["few"]["mean"] - table["unguided"]["few"]["mean"])
    assert "paired difference to unguided" in "\n".join(lines)


def test_base_training_stage_for_users_without_a_trained_classifier(world, tmp_path):
    """Data but no trained classifier: the base stage trains the architecture, then an Epistemic Head; the
    mining stage starts from it and guides with a head signal."""
    out = tmp_path / "run"
    over = [*base_overrides(world, out), "classifier.spec=longtail.train:SmallCNN", "classifier.checkpoint=null",
            "classifier.model_kwargs={in_channels: 1, width: 8}", "base.epochs=2", "heads.epochs=1",
            "heads.num_heads=3", "schedule.epochs=2", "schedule.per_round=3", "guidance.signal=epistemic"]
    result = run_mine(load_config(MineConfig, overrides=over), show=False, log=lambda m: None)
    base = out / "seed_0" / "base"
    for name in ("classifier.safetensors", "heads.safetensors", "classifier.json", "test_scores.safetensors"):
        assert (base / name).is_file(), name
    assert "epistemic" in result["per_seed"]["0"]["base"]["detection"]
    assert history(result)[-1]["synthetic"] == 3
    assert {r["signal_name"] for r in manifest(out)} == {"epistemic"}
    # the base stage resumes: a second run loads it instead of training again
    stamp = (base / "classifier.safetensors").stat().st_mtime_ns
    run_mine(load_config(MineConfig, overrides=over), show=False, log=lambda m: None)
    assert (base / "classifier.safetensors").stat().st_mtime_ns == stamp
    # a run's classifier.json is a classifier spec for the next run (its heads come along)
    again = [*base_overrides(world, tmp_path / "again"), f"classifier.spec={base / 'classifier.json'}",
             "classifier.checkpoint=null", "classifier.model_kwargs={}", "schedule.epochs=1",
             "schedule.per_round=3", "guidance.signal=epistemic"]
    result = run_mine(load_config(MineConfig, overrides=again), show=False, log=lambda m: None)
    assert "epistemic" in result["per_seed"]["0"]["base"]["detection"]
    assert result["per_seed"]["0"]["base"]["top1"] == pytest.approx(
        json.loads((base / "metrics.json").read_text())["top1"])


def test_introspection_is_a_stage_and_a_condition_of_any_run(world, tmp_path):
    out = tmp_path / "run"
    over = [*base_overrides(world, out), "conditions=[introspect]", "schedule.epochs=2", "schedule.per_round=3",
            "introspection.images_per_class=2", "introspection.pairs=2"]
    run_mine(load_config(MineConfig, overrides=over), show=False, log=lambda m: None)
    prompts = json.loads((out / "introspection" / "prompts.json").read_text())
    assert set(prompts) == set(CLASSES)
    rows = manifest(out, "introspect")
    # prompt: the text the generator's encoder saw; prompt_full: the whole prompt when its token limit cut it
    assert len(rows) == 3 and all((r["prompt_full"] or r["prompt"]) in prompts[r["class_name"]] for r in rows)
    assert all((r["prompt_full"] or r["prompt"]).startswith(r["prompt"]) for r in rows)
    assert (out / "introspection" / "keywords.json").is_file()


@pytest.mark.parametrize(("setting", "match"), [
    ("conditions=[ltg, 'ltg:bogus']", "bogus"),
    ("conditions=[ltg, ltg]", "twice"),
    ("base.epochs=3", "drop classifier.checkpoint"),
    ("data.source=parquet", "data.source"),
    ("introspection.captioner=magic", "introspection.captioner"),
    ("introspection.captioner=openai:gpt", "llm_url"),
    ("judge.spec=train", "judge.spec=train trains on the full balanced Fashion-MNIST"),
    ("judge.min_ratio=0.9", "judge.min_ratio needs a judge"),
    ("judge.spec=/no/such/judge", "judge.spec: /no/such/judge does not exist"),
])
def test_settings_that_cannot_work_are_named(world, tmp_path, setting, match):
    over = [*base_overrides(world, tmp_path / "run"), setting]
    with pytest.raises(ConfigError, match=match):
        run_mine(load_config(MineConfig, overrides=over), show=False, log=lambda m: None)


def test_an_embedded_generator_refuses_classes_it_never_saw(world, tmp_path):
    train = write_folder(tmp_path / "train", 3)
    (train / "bag").rename(train / "circle")
    val = write_folder(tmp_path / "val", 2)
    (val / "bag").rename(val / "circle")
    over = [*base_overrides(world, tmp_path / "run"), f"data.train={train}", f"data.val={val}"]
    with pytest.raises(ConfigError, match=r"knows only .* cannot draw \['circle'\]"):
        run_mine(load_config(MineConfig, overrides=over), dry_run=True, show=False, log=lambda m: None)


def test_best_of_n_keeps_the_highest_signal_per_class_with_an_exact_count(world, tmp_path):
    out = tmp_path / "run"
    over = [*base_overrides(world, out), "conditions=['bestof:entropy@3']", "schedule.epochs=2",
            "schedule.per_round=3"]
    result = run_mine(load_config(MineConfig, overrides=over), show=False, log=lambda m: None)
    assert history(result, "bestof:entropy@3")[-1]["synthetic"] == 3
    kept = manifest(out, "bestof_entropy_w3")
    with (mining_dir(out, "bestof_entropy_w3") / "candidates" / "manifest.csv").open() as f:
        candidates = list(csv.DictReader(f))
    assert len(kept) == 3 and len(candidates) == 9 and {r["signal_name"] for r in candidates} == {"entropy"}
    kept_ids = {r["id"] for r in kept}
    for name in CLASSES:
        pool = [r for r in candidates if r["class_name"] == name]
        chosen = [float(r["signal"]) for r in pool if r["id"] in kept_ids]
        rest = [float(r["signal"]) for r in pool if r["id"] not in kept_ids]
        assert len(chosen) == 1 and len(pool) == 3 and min(chosen) >= max(rest)
    assert {float(r["weight"]) for r in kept} == {0.0}


def _judge_dir(world, root: Path) -> Path:
    from longtail.jobs.common import write_classifier_json

    return write_classifier_json(root / "judge", "longtail.train:make_classifier",
                                 str(world["root"] / "clf.safetensors"), model_kwargs={"width": 8, "num_heads": 3},
                                 num_classes=3, class_names=sorted(CLASSES), preprocess={"size": 32, "in_channels": 1}
                                 ).parent


def test_judge_filter_keeps_only_accepted_images_and_the_exact_count(world, tmp_path, monkeypatch):
    """'+judge': what the judge rejects is replaced by new images until each class has its count."""
    import longtail.jobs.stages as stages

    def every_other(judge, root, rows, class_names, verdicts):  # a judge that accepts even indices only
        verdicts.update({row["id"]: int(row["index"]) % 2 == 0 for row in rows})

    monkeypatch.setattr(stages, "judge_rows", every_other)
    out = tmp_path / "run"
    over = [*base_overrides(world, out), "conditions=['unguided+judge']", "schedule.epochs=2",
            "schedule.per_round=6", f"judge.spec={_judge_dir(world, tmp_path)}"]
    result = run_mine(load_config(MineConfig, overrides=over), show=False, log=lambda m: None)
    kept = manifest(out, "unguided_judge")
    assert history(result, "unguided+judge")[-1]["synthetic"] == 6 == len(kept)
    assert all(int(r["index"]) % 2 == 0 for r in kept)
    assert sorted(r["class_name"] for r in kept) == sorted(CLASSES * 2)

    monkeypatch.setattr(stages, "judge_rows", lambda j, root, rows, names, verdicts: verdicts.update(
        {row["id"]: row["class_name"] == "bag" for row in rows}))  # never accepts the other classes
    with pytest.raises(RuntimeError, match="rejected too many"):
        run_mine(load_config(MineConfig, overrides=[*over, f"out={tmp_path / 'run2'}"]), show=False,
                 log=lambda m: None)


def test_judge_rows_asks_the_judge_for_each_image(tmp_path):
    import numpy as np
    import torch

    from longtail.data.store import SyntheticStore
    from longtail.jobs.stages import judge_rows

    store = SyntheticStore(tmp_path / "s")
    store.add(np.stack([np.full((8, 8), v, np.uint8) for v in (0, 255, 255)]),
              [{"id": f"i{k}", "class_name": name} for k, name in enumerate(["dark", "dark", "bright"])])

    class Brightness:  # class 1 ("bright") when the mean pixel is above 0
        def probs(self, images):
            bright = (images.mean(dim=(1, 2, 3)) > 0).long()
            return torch.nn.functional.one_hot(bright, 2).float()

    verdicts: dict[str, bool] = {}
    judge_rows(Brightness(), store.root, store.rows(), ["dark", "bright"], verdicts)
    assert verdicts == {"i0": True, "i1": False, "i2": True}


def test_generator_class_check_is_shared_by_every_job():
    from longtail.jobs.common import GeneratorSpec, check_generator_classes

    known = ["coat", "bag"]
    check_generator_classes(GeneratorSpec(), known, ["bag"])
    check_generator_classes(GeneratorSpec(kind="sd", model="x"), known, ["circle"])  # prompted with any name
    check_generator_classes(GeneratorSpec(prompt_file="p.json"), known, ["circle"])  # the user's own prompts
    with pytest.raises(ConfigError, match=r"cannot draw \['circle'\]"):
        check_generator_classes(GeneratorSpec(), known, ["bag", "circle"])


def test_settings_added_later_or_the_default_generator_by_name_do_not_count_as_other_settings():
    from longtail.jobs.mine import differs

    old = {"kind": "embedded", "model": None, "num_steps": 20}
    assert not differs(old, {"kind": "embedded", "model": "clean", "num_steps": 20, "new_key": 1})
    assert differs(old, {"kind": "embedded", "model": "nuisance", "num_steps": 20})
    assert differs({"epochs": 6, "lr": 0.002}, {"epochs": 6, "lr": 0.001, "bootstrap": False})
    assert differs({"a": {"b": 1}}, {"a": {}})  # a key the new settings lack
    assert not differs({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}})
    from longtail.jobs.mine import differing_keys

    assert differing_keys({"heads": {"epsilon": 0.0, "k": 5}, "x": 1}, {"heads": {"epsilon": 0.8, "k": 5}, "x": 2}) \
        == ["heads.epsilon", "x"]
    # the shipped judge is the one `train` makes in 3 epochs: a run made with either resumes with the other
    trained = {"spec": "train", "epochs": 3, "min_ratio": 0.9, "real_per_class": 100}
    assert not differs(trained, {**trained, "spec": "shipped"})
    assert not differs({**trained, "spec": "shipped"}, trained)
    assert differs({**trained, "epochs": 1}, {**trained, "spec": "shipped"})
    assert differs({**trained, "spec": "shipped"}, {**trained, "spec": "clip:/x"})


def test_heads_settings_that_cannot_work_are_named_before_any_work(tmp_path):
    from longtail.jobs.mine import load_demo_config
    from longtail.jobs.mine_config import check_config

    with pytest.raises(ConfigError, match=r"heads\.num_heads must be >= 2 .*got 1"):
        check_config(load_demo_config(overrides=[f"out={tmp_path}", "heads.num_heads=1"]))
    with pytest.raises(ConfigError, match=r"heads\.num_heads must be >= 2"):  # no division by zero on the way
        check_config(load_demo_config(overrides=[f"out={tmp_path}", "heads.num_heads=0", "heads.epsilon=1.5"]))
