"""`longtail evaluate` on a generated set with a manifest, against real data, with training counts."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import save_file

from longtail.train import make_classifier
from test_mine import write_folder

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_evaluate_a_generated_set(tmp_path):
    from longtail.testing import tiny_generator

    gen = tiny_generator(tmp_path / "gen")
    torch.manual_seed(0)
    save_file(make_classifier(3, width=8, num_heads=3).state_dict(), str(tmp_path / "clf.safetensors"))
    (tmp_path / "clf.json").write_text(json.dumps({
        "spec": "longtail.train:make_classifier", "checkpoint": "clf.safetensors", "num_classes": 3,
        "model_kwargs": {"width": 8, "num_heads": 3}, "preprocess": {"size": 32, "in_channels": 1}}))
    (tmp_path / "names.txt").write_text("coat\nsandal\nbag\n")
    common = ["--classifier", str(tmp_path / "clf.json"), "--set", f"classifier.class_names={tmp_path / 'names.txt'}"]
    subprocess.run([sys.executable, "-m", "longtail", "generate", "--out", str(tmp_path / "syn"), "--generator",
                    str(gen), *common, "--per-class", "2", "--steps", "2", "--signal", "total", "--weight", "0.5",
                    "--device", "cpu", "--set", "generator_check.per_class=0", "--no-progress"], env=ENV, check=True,
                   capture_output=True)
    real = write_folder(tmp_path / "real", 4)
    train = write_folder(tmp_path / "train", 30)
    done = subprocess.run([sys.executable, "-m", "longtail", "evaluate", str(tmp_path / "syn"), *common,
                           "--train", str(train), "--real", str(real), "--out", str(tmp_path / "ev")],
                          env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "ev" / "evaluate.json").read_text())
    assert report["n"] == 6 and set(report["accuracy"]) >= {"top1", "many", "medium", "few"}
    assert report["groups"] == ["medium"] * 3  # 30 training images per class
    assert set(report["by_weight"]) == {"0.5"} and report["by_weight"]["0.5"]["n"] == 6
    assert 0 <= report["by_weight"]["0.5"]["p_class"] <= 1
    assert {"fid", "precision", "recall"} <= set(report["distribution"]["overall"])
    assert "epistemic" in report["detection"] and "AUROC rare" in done.stdout
