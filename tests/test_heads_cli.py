"""`longtail heads train` on a tiny random classifier and tiny ImageFolders (through typer's CliRunner), and the
time columns of `longtail heads overhead`."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from longtail.cli import app
from longtail.heads import EpistemicClassifier
from longtail.jobs import stages
from longtail.jobs.common import ClassifierSpec, load_classifier_spec, write_classifier_json
from longtail.models.classifiers import load_classifier
from longtail.train import SmallCNN

CLASSES = ("bag", "coat", "sandal")  # sorted, as the folder names become the classes without a names file
SIGNALS = ("entropy", "energy", "total", "aleatoric", "epistemic")
SPEC = "longtail.train:SmallCNN"


def write_folder(root: Path, per_class: int, seed: int, classes=CLASSES) -> Path:
    """Grayscale 20x20 PNGs of the ``classes`` among :data:`CLASSES`: a square whose size depends on the class's
    place in :data:`CLASSES`, so a folder with some classes draws them as a folder with all does."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        if name not in classes:
            continue
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.zeros((20, 20), np.uint8)
            size = 4 + 4 * c
            y, x = rng.integers(0, 20 - size, 2)
            img[y : y + size, x : x + size] = 200
            Image.fromarray(img, "L").save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads_cli")
    torch.manual_seed(0)
    save_file(SmallCNN(1, len(CLASSES)).state_dict(), str(root / "clf.safetensors"))
    write_classifier_json(root / "described", SPEC, str(root / "clf.safetensors"),
                          model_kwargs={"in_channels": 1}, num_classes=3, class_names=list(CLASSES),
                          preprocess={"size": 16, "in_channels": 1})
    return {"root": root, "train": write_folder(root / "train", 6, seed=0), "val": write_folder(root / "val", 6, seed=1),
            "ckpt": root / "clf.safetensors", "json": root / "described" / "classifier.json"}


def base_args(world, out: Path) -> list[str]:
    """The classifier described by a classifier.json (spec, checkpoint, class names, input size)."""
    return ["heads", "train", "--classifier", str(world["json"]), "--data", str(world["train"]),
            "--out", str(out), "--num-heads", "3", "--epochs", "1", "--batch-size", "6", "--device", "cpu",
            "--no-progress"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def fresh_base() -> torch.nn.Module:
    torch.manual_seed(123)  # different from the checkpoint's seed: only the loaded weights can make them agree
    return SmallCNN(1, len(CLASSES))


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_train_writes_loadable_heads_a_report_and_leaves_the_base_bit_identical(world, tmp_path, monkeypatch):
    trained = []

    def spy(*args, **kwargs):
        trained.append(real(*args, **kwargs))
        return trained[-1]

    real = stages.train_heads
    monkeypatch.setattr(stages, "train_heads", spy)
    checkpoint = hashlib.sha256(world["ckpt"].read_bytes()).hexdigest()
    out = tmp_path / "heads"
    args = ["heads", "train", "--classifier", SPEC, "--checkpoint", str(world["ckpt"]), "--num-classes", "3",
            "--image-size", "16", "--data", str(world["train"]), "--val", str(world["val"]), "--out", str(out),
            "--num-heads", "3", "--epochs", "2", "--batch-size", "6", "--epsilon", "0.1", "--bootstrap",
            "--device", "cpu", "--no-progress"]
    result = invoke(*args, "--lr", "0.01")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "warning" not in result.output  # trained weights given: no untrained-base warning
    assert hashlib.sha256(world["ckpt"].read_bytes()).hexdigest() == checkpoint  # the user's file untouched

    # the base inside the trained model: every tensor bit-identical to the checkpoint, logits too
    (wrapped,) = trained
    from safetensors.torch import load_file

    for name, value in wrapped.base.state_dict().items():
        assert torch.equal(value, load_file(str(world["ckpt"]))[name]), name
    base = fresh_base()
    base.load_state_dict(load_file(str(world["ckpt"])))
    x = torch.randn(4, 1, 16, 16)
    assert torch.equal(wrapped.eval()(x).logits, base.eval()(x))

    # the heads file loads through the normal path (load_classifier(heads=...)), and the heads were trained
    loaded = load_classifier(SPEC, num_classes=3, checkpoint=world["ckpt"], heads=out / "heads.safetensors")
    assert isinstance(loaded.model, EpistemicClassifier) and loaded.model.heads.num_heads == 3
    assert torch.equal(loaded.model.heads.weight, wrapped.heads.weight.detach().cpu())
    untrained = EpistemicClassifier(base, num_heads=3, seed=0)
    assert not torch.allclose(loaded.model.heads.weight, untrained.heads.weight)
    assert torch.equal(loaded.model(x).logits, base(x))
    # ... and so does the classifier.json written next to it, class names from the sorted folders
    described = load_classifier_spec(ClassifierSpec(spec=str(out / "classifier.json")), torch.device("cpu"))
    assert isinstance(described.model, EpistemicClassifier) and described.class_names == list(CLASSES)
    assert torch.equal(described.model(x).head_logits, loaded.model(x).head_logits)

    report = json.loads((out / "report.json").read_text())
    assert report["num_images"] == 18 and set(report["detection"]) == set(SIGNALS)
    for name in SIGNALS:
        entry = report["detection"][name]
        assert 0.0 <= entry["auroc_hard"] <= 1.0, (name, entry)
        assert 0.0 <= entry["acc_above_q90"] <= 1.0 and 0.0 <= entry["acc_below_q90"] <= 1.0
    settings = json.loads((out / "heads.json").read_text())
    assert settings["base_unchanged"] and settings["epsilon"] == 0.1 and settings["bootstrap"]
    table = result.output[result.output.index("AUROC hard"):]
    for name in SIGNALS:
        auroc = float(re.search(rf"^{name}\s+([0-9.]+)", table, re.M).group(1))
        assert auroc == pytest.approx(report["detection"][name]["auroc_hard"], abs=5e-4)


def _mismatched_names(world, tmp_path) -> tuple[list[str], str]:
    names = tmp_path / "names.txt"
    names.write_text("bag\ncoat\nshoe\n")
    return ["--class-names", str(names)], r"--data: .*missing folders \['shoe'\]; folders not among the classes \['sandal'\]"


def _two_classes(world, tmp_path) -> tuple[list[str], str]:
    data = write_folder(tmp_path / "two", 2, seed=3, classes=CLASSES[:2])
    return ["--classifier", SPEC, "--checkpoint", str(world["ckpt"]), "--num-classes", "3", "--image-size", "16",
            "--data", str(data)], r"--data: .*two has 2 class folders but the classifier has 3 classes"


def _out_is_a_file(world, tmp_path) -> tuple[list[str], str]:
    (tmp_path / "file").write_text("keep me")
    return ["--out", str(tmp_path / "file")], r"--out .*file exists and is not a directory"


BAD = {
    "one head": lambda w, t: (["--num-heads", "1"], r"--num-heads must be at least 2 .*got 1"),
    "epsilon > 1": lambda w, t: (["--epsilon", "1.5"], r"--epsilon must lie in \[0, 1\].*got 1\.5"),
    "epsilon < 0": lambda w, t: (["--epsilon", "-0.1"], r"--epsilon must lie in \[0, 1\].*got -0\.1"),
    "missing data": lambda w, t: (["--data", str(t / "nowhere")], r"--data: image folder .*nowhere does not exist"),
    "missing val": lambda w, t: (["--val", str(t / "noval")], r"--val: image folder .*noval does not exist"),
    "class names": _mismatched_names,
    "class count": _two_classes,
    "out is a file": _out_is_a_file,
    "head name": lambda w, t: (["--head-name", "nope"], r"head module 'nope' not found .*--head-name"),
}


@pytest.mark.parametrize("problem", sorted(BAD))
def test_bad_inputs_are_refused_naming_the_input(world, tmp_path, problem):
    extra, message = BAD[problem](world, tmp_path)
    out = tmp_path / "out"
    result = invoke(*base_args(world, out), *extra)
    assert result.exit_code != 0
    assert result.exception is not None and re.search(message, str(result.exception)), str(result.exception)
    assert not out.exists()  # refused before anything was written
    if problem == "out is a file":
        assert (tmp_path / "file").read_text() == "keep me"


def test_existing_heads_are_never_clobbered_without_overwrite(world, tmp_path):
    out = tmp_path / "heads"
    first = invoke(*base_args(world, out))
    assert first.exit_code == 0, (first.output, first.exception)
    (out / "notes.txt").write_text("mine")  # an unrelated file in the directory is left alone
    before = file_bytes(out)
    again = invoke(*base_args(world, out), "--seed", "1")
    assert again.exit_code != 0
    assert re.search(r"--out .* already holds heads\.safetensors, classifier\.json.*--overwrite", str(again.exception))
    assert file_bytes(out) == before
    replaced = invoke(*base_args(world, out), "--seed", "1", "--overwrite")
    assert replaced.exit_code == 0, (replaced.output, replaced.exception)
    after = file_bytes(out)
    assert after["heads.safetensors"] != before["heads.safetensors"] and after["notes.txt"] == b"mine"
    assert not list(out.glob(".*.tmp"))
    loaded = load_classifier_spec(ClassifierSpec(spec=str(out / "classifier.json")), torch.device("cpu"))
    assert loaded.model.heads.num_heads == 3


def _ratios(output: str) -> dict[str, float]:
    found = re.findall(r"^\s+(forward|forward\+backward)\s+x([0-9.]+) \(([-+][0-9.]+)%\)\s+base ([0-9.]+) ms",
                       output, re.M)
    return {name: float(ratio) for name, ratio, _, _ in found}


def test_overhead_times_forward_and_backward_and_prints_the_ratios():
    args = ["heads", "overhead", "--arch", "resnet18", "--num-classes", "10", "--heads", "5"]
    timed = invoke(*args, "--batch-size", "2", "--image-size", "32", "--repeats", "2", "--device", "cpu")
    assert timed.exit_code == 0, (timed.output, timed.exception)
    ratios = _ratios(timed.output)
    assert set(ratios) == {"forward", "forward+backward"} and all(r > 0 for r in ratios.values()), timed.output
    assert "batch 2 x 3x32x32 on cpu" in timed.output
    last = timed.output.strip().splitlines()[-1]
    assert re.fullmatch(r"overhead: time [-+][0-9.]+% forward, [-+][0-9.]+% forward\+backward; "
                        r"parameters 0\.23%", last), last
    untimed = invoke(*args, "--no-time")
    assert untimed.exit_code == 0 and not _ratios(untimed.output)
    assert untimed.output.strip().splitlines()[-1] == "overhead: 0.23%"
    assert "25,600 (K x d x C)" in untimed.output


def test_a_named_architecture_without_checkpoint_is_flagged_as_untrained():
    from longtail.jobs.heads import untrained_base

    assert untrained_base(ClassifierSpec(spec="resnet18"))
    assert untrained_base(ClassifierSpec(spec="timm:vit_tiny_patch16_224"))
    assert not untrained_base(ClassifierSpec(spec="resnet18", checkpoint="w.safetensors"))
    assert not untrained_base(ClassifierSpec(spec=SPEC))  # an entry point may load its own weights
    assert not untrained_base(ClassifierSpec(spec="hf:/models/vit"))  # a Hugging Face directory holds weights


def test_a_classifier_json_names_local_specs_by_absolute_path(tmp_path, monkeypatch):
    """``hf:<dir>`` and ``file.py:function`` specs written relative to one working directory load from another."""
    from longtail.jobs.common import portable_spec

    (tmp_path / "vit").mkdir()
    (tmp_path / "clf.py").write_text("def make(num_classes=3):\n    raise NotImplementedError\n")
    monkeypatch.chdir(tmp_path)
    assert portable_spec("hf:vit") == f"hf:{tmp_path / 'vit'}"
    assert portable_spec("clf.py:make") == f"{tmp_path / 'clf.py'}:make"
    for unchanged in ("resnet18", "timm:resnet18", SPEC, "hf:/no/such/dir", "missing.py:make"):
        assert portable_spec(unchanged) == unchanged
    written = write_classifier_json(tmp_path / "out", "hf:vit", None)
    assert json.loads(written.read_text())["spec"] == f"hf:{tmp_path / 'vit'}"
