"""Wrong numbers never pass silently: each input fault gives the right value or one clear error.

Class folders are matched by name; weights load through one guarded loader; JSON is strict; hidden entries are
skipped; every PIL mode decodes faithfully or is refused; a bad step count is refused before any model runs;
small-sample FID / precision / recall are flagged. Tiny generated inputs only.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from longtail.data.datasets import DataError
from longtail.data.imagefolder import ImageListDataset, convert_image, load_image, scan_imagefolder
from longtail.files import WeightsError, write_json

SRC = Path(__file__).resolve().parents[1] / "src" / "longtail"
NAMES = ["coat", "ankle boot", "café"]  # NFC; "ankle boot" is written by `generate` as the folder ankle_boot


def reject(constant: str) -> None:
    raise ValueError(f"not RFC 8259 JSON: {constant}")


def png(path: Path, value: int = 100, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8), "L").save(path)
    return path


def classifier_json(root: Path, names: list[str] | None = NAMES) -> Path:
    """A seeded 3-class embedded-default classifier (with heads) as a run's classifier.json."""
    from longtail.train import make_classifier

    root.mkdir(parents=True, exist_ok=True)
    save_file(make_classifier(3, width=4, num_heads=2).state_dict(), str(root / "clf.safetensors"))
    spec = {"spec": "longtail.train:make_classifier", "checkpoint": "clf.safetensors", "num_classes": 3,
            "model_kwargs": {"width": 4, "num_heads": 2}, "preprocess": {"size": 32, "in_channels": 1}}
    if names is not None:
        (root / "names.json").write_text(json.dumps(names))
        spec["class_names"] = "names.json"
    (root / "classifier.json").write_text(json.dumps(spec))
    return root / "classifier.json"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`longtail evaluate` on a test folder that lacks "coat", names "ankle boot" as generate writes it and
    "café" decomposed (NFD, as macOS writes it); no training counts, so no class is rare."""
    from longtail.evaluation.run import EvaluateConfig, run_evaluate
    from longtail.jobs.common import ClassifierSpec

    tmp = tmp_path_factory.mktemp("evaluate")
    data = tmp / "data"
    for folder, value in (("ankle_boot", 60), (unicodedata.normalize("NFD", "café"), 200)):
        for i in range(2):
            png(data / folder / f"{i}.png", value + i)
    lines: list[str] = []
    cfg = EvaluateConfig(classifier=ClassifierSpec(spec=str(classifier_json(tmp / "clf"))), data=str(data),
                         out=str(tmp / "ev"), device="cpu", batch_size=8)
    report = run_evaluate(cfg, log=lines.append)
    return {"data": data, "lines": lines, "report": report, "text": (tmp / "ev" / "evaluate.json").read_text()}


# --- 1. class identity by name ------------------------------------------------------------------------------


def test_folders_are_matched_to_classes_by_name_not_position(evaluated):
    index = scan_imagefolder(evaluated["data"], NAMES, allow_missing=True)
    assert index.labels == [1, 1, 2, 2]  # by position they were [0, 0, 1, 1]: every label shifted
    assert index.missing == ["coat"] and index.folders[1] == "ankle_boot"
    with pytest.raises(DataError, match=r"missing folders \['coat'\]"):  # a training set may not lack a class
        scan_imagefolder(evaluated["data"], NAMES)


def test_evaluate_warns_about_a_missing_class_and_reports_its_accuracy_as_null(evaluated):
    assert any(line.startswith("warning:") and "['coat']" in line for line in evaluated["lines"])
    saved = json.loads(evaluated["text"])
    assert saved["class_names"] == NAMES and saved["missing_classes"] == ["coat"] and saved["n"] == 4
    per_class = saved["accuracy"]["per_class"]
    assert per_class[0] is None and all(0.0 <= a <= 1.0 for a in per_class[1:])
    assert saved["accuracy"]["per_class_reason"] == "no test examples of classes [0]"


def test_without_class_names_a_folder_count_unlike_the_classifiers_is_an_error(tmp_path):
    for folder in ("a", "b"):
        png(tmp_path / folder / "0.png")
    with pytest.raises(DataError, match="has 2 class folders but the classifier has 3 classes"):
        scan_imagefolder(tmp_path, None, num_classes=3)
    assert scan_imagefolder(tmp_path, None, num_classes=2).class_names == ["a", "b"]


# --- 2. one weight loader -----------------------------------------------------------------------------------


def _calls(predicate) -> set[tuple[str, str]]:
    """(file, enclosing function) of every call in src/longtail matching ``predicate(call node)``."""
    found = set()
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for func in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]:
            for node in ast.walk(func):
                if isinstance(node, ast.Call) and predicate(node.func):
                    found.add((path.relative_to(SRC).as_posix(), func.name))
    return found


def test_torch_load_is_called_only_by_the_one_loader():
    def is_torch_load(f: ast.expr) -> bool:
        return isinstance(f, ast.Attribute) and f.attr == "load" and getattr(f.value, "id", None) == "torch"

    assert _calls(is_torch_load) == {("files.py", "load_checkpoint")}


# Files this change could not edit; each should call longtail.files.read_state_dict instead.
SAFETENSORS_PENDING: set[tuple[str, str]] = set()


def test_safetensors_are_read_only_by_the_one_loader():
    def is_safetensors_load(f: ast.expr) -> bool:
        return getattr(f, "id", getattr(f, "attr", None)) in ("load_file", "safe_open")

    found = _calls(is_safetensors_load)
    assert found - SAFETENSORS_PENDING == {("files.py", "load_checkpoint"), ("files.py", "safetensors_metadata")}


@pytest.mark.parametrize("kind", ["pickled module", "bare tensor", "not safetensors", "not a torch file"])
def test_fid_weights_that_are_not_a_state_dict_are_one_clear_error(tmp_path, kind):
    from longtail.evaluation.features import InceptionFeatures

    path = tmp_path / ("w.safetensors" if kind == "not safetensors" else "w.pth")
    if kind == "pickled module":
        torch.save(torch.nn.Linear(2, 2), path)
    elif kind == "bare tensor":
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(b"not weights at all")
    with pytest.raises(WeightsError) as err:
        InceptionFeatures(path)
    message = str(err.value)
    assert message.startswith(f"FID Inception weights {path}") and "re-save" in message and "\n" not in message


def test_the_cli_prints_a_weights_error_as_one_line(tmp_path, monkeypatch, capsys):
    from longtail import cli

    torch.save(torch.nn.Linear(2, 2), tmp_path / "inception.pth")
    for name in NAMES:
        png(tmp_path / "data" / name / "0.png")
        png(tmp_path / "data" / name / "1.png", 30)
    monkeypatch.setattr("sys.argv", ["longtail", "evaluate", str(tmp_path / "data"), "--classifier",
                                     str(classifier_json(tmp_path / "clf")), "--real", str(tmp_path / "data"),
                                     "--set", f"inception={tmp_path / 'inception.pth'}", "--set", "device=cpu"])
    with pytest.raises(SystemExit) as done:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"longtail: error: FID Inception weights {tmp_path / 'inception.pth'} could not "
                             "be read with torch.load(weights_only=True) (UnpicklingError: Unsupported global")


# --- 3. strict JSON -----------------------------------------------------------------------------------------


def test_evaluate_json_is_strict_and_a_one_class_auroc_is_null_with_its_reason(evaluated):
    saved = json.loads(evaluated["text"], parse_constant=reject)  # no NaN / Infinity anywhere
    entropy = saved["detection"]["entropy"]
    assert entropy["auroc_rare"] is None
    assert entropy["auroc_rare_reason"] == "only one class present: none of the 4 examples is rare"
    assert "auroc_hard_reason" not in entropy or entropy["auroc_hard"] is None
    row = next(line for line in evaluated["lines"] if line.startswith("entropy"))
    assert row.split()[1] == "n/a" and "nan" not in " ".join(evaluated["lines"])


def test_write_json_writes_non_finite_numpy_and_torch_values_as_strict_json(tmp_path):
    data = {"nan": math.nan, "inf": -math.inf, "np_nan": np.float32("nan"), "np": np.float32(1.5),
            "np_int": np.int64(3), "np_bool": np.bool_(True), "torch_inf": torch.tensor(float("inf")),
            "torch": torch.tensor(2.0), "nested": [(math.nan, 1.0)]}
    text = write_json(tmp_path / "x.json", data).read_text()
    assert json.loads(text, parse_constant=reject) == {
        "nan": None, "inf": None, "np_nan": None, "np": 1.5, "np_int": 3, "np_bool": True, "torch_inf": None,
        "torch": 2.0, "nested": [[None, 1.0]]}


# --- 4. hidden entries --------------------------------------------------------------------------------------


def test_hidden_entries_are_skipped_at_every_level_and_counted(tmp_path):
    for name in ("a", "b"):
        png(tmp_path / name / "0.png")
        (tmp_path / name / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # a macOS resource fork
        (tmp_path / name / ".DS_Store").write_bytes(b"Bud1")
    png(tmp_path / "__MACOSX" / "a" / "._0.png")
    png(tmp_path / ".cache" / "0.png")
    (tmp_path / ".DS_Store").write_bytes(b"Bud1")
    for names in (None, ["a", "b"]):
        index = scan_imagefolder(tmp_path, names)
        assert index.class_names == ["a", "b"] and [p.name for p in index.paths] == ["0.png", "0.png"]
        assert index.hidden == 3 + 2 * 2 and index.skipped == []


# --- 5. image decoding --------------------------------------------------------------------------------------


def _pixels(img: Image.Image) -> list:
    return np.asarray(img).tolist()


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert _pixels(load_image(tmp_path / "g16.png", "L")) == [[0, 100, 255]]  # was [[0, 255, 255]]
    x, _ = ImageListDataset([tmp_path / "g16.png"], [0], lambda im: torch.from_numpy(np.array(im)), "RGB")[0]
    assert x[0].tolist() == [[0, 0, 0], [100, 100, 100], [255, 255, 255]]
    wide = Image.fromarray(np.array([[0, 25700, 65535]], np.int32), "I")
    assert _pixels(convert_image(wide, "L")) == [[0, 100, 255]]
    with pytest.raises(DataError, match=r"mode 'I' \(values 0\.\.70000 outside the 16-bit range\)"):
        convert_image(Image.fromarray(np.array([[0, 70000]], np.int32), "I"), "L")


def test_transparency_is_composited_over_white(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png", transparency=0)  # pixel 0: transparent red
    assert _pixels(load_image(tmp_path / "p.png")) == [[[255, 255, 255], [0, 255, 0]]]  # was red
    half = Image.new("LA", (1, 1), (0, 128))
    assert _pixels(convert_image(half, "L")) == [[127]]


def test_cmyk_and_exif_orientation(tmp_path):
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    assert all(abs(a - b) <= 2 for a, b in zip(_pixels(load_image(tmp_path / "c.jpg"))[0][0], [255, 0, 0],
                                                strict=True))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees
    Image.new("RGB", (4, 2), (9, 9, 9)).save(tmp_path / "e.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "e.jpg").size == (2, 4)  # was (4, 2)


def test_a_mode_without_a_faithful_conversion_is_refused_by_name(tmp_path):
    path = tmp_path / "cls" / "f.tif"
    path.parent.mkdir()
    Image.fromarray(np.array([[0.0, 0.5]], np.float32)).save(path)  # PIL's convert gives [0, 0]
    with pytest.raises(DataError, match=rf"{path}: image mode 'F' \(floating point, range unknown\)"):
        load_image(path, "L")
    with pytest.raises(DataError, match=rf"{path}: unreadable image \(image mode 'F'"):
        scan_imagefolder(tmp_path)


# --- 6. sampling steps --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
@pytest.mark.parametrize("steps", [0, -1, 1000, 1001])
def test_steps_outside_the_schedulers_range_are_refused_before_any_denoiser_call(scheduler, steps):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from longtail.sampling import sample

    sched = DDIMScheduler(clip_sample=False, steps_offset=1) if scheduler == "ddim" else DPMSolverMultistepScheduler()

    def denoiser(*_):
        raise AssertionError("the denoiser ran")

    with pytest.raises(ValueError, match=rf"num_steps must be an integer from 1 to 999 \(the scheduler was trained "
                                         rf"with 1000 timesteps\), got {steps}"):
        sample(denoiser=denoiser, scheduler=sched, decode=lambda z: z, cond=torch.zeros(1, 2),
               latents=torch.zeros(1, 1, 2, 2), num_steps=steps)


def test_generate_refuses_bad_steps_before_loading_a_model_or_writing(tmp_path, monkeypatch):
    from longtail.config import ConfigError
    from longtail.jobs import generate as job
    from longtail.jobs.common import GeneratorSpec

    monkeypatch.setattr(job, "load_generator", lambda *_: pytest.fail("the generator was loaded"))
    cfg = job.GenerateConfig(out=str(tmp_path / "out"), generator=GeneratorSpec(num_steps=1000), device="cpu")
    with pytest.raises(ConfigError, match=r"generator\.num_steps \(--steps\) must be an integer from 1 to 999"):
        job.run_generate(cfg, show=False)
    assert not (tmp_path / "out").exists()


# --- 7. small-sample FID / precision / recall ---------------------------------------------------------------


def test_small_samples_carry_counts_and_are_flagged_unreliable_with_a_warning(caplog):
    from longtail.evaluation.distribution import distribution_report

    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(20, 32, generator=g), torch.randn(21, 32, generator=g)
    labels_real, labels_fake = torch.tensor([0] * 19 + [1]), torch.tensor([0] * 21)
    with caplog.at_level(logging.WARNING, logger="longtail.evaluation.distribution"):
        report = distribution_report(real, labels_real, fake, labels_fake, ["a", "b"])
    overall = report["overall"]
    assert (overall["n_real"], overall["n_fake"], overall["reliable"]) == (20, 21, False)
    assert overall["reason"].startswith("FID on 32-d features needs more than 32 images per set for a full-rank "
                                        "covariance; got 20 real, 21 synthetic")
    assert "precision / recall need at least 100 images per set" in overall["reason"]
    assert "reliable" in caplog.text and "2 of 2 classes unreliable" in caplog.text
    b = report["per_class"]["b"]  # one real image, no synthetic ones: nothing to compute
    assert math.isnan(b["fid"]) and b["fid_reason"].startswith("FID needs at least 2 images per set")


def test_enough_samples_are_reliable_and_quiet(caplog):
    from longtail.evaluation.distribution import distribution_report

    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(100, 4, generator=g), torch.randn(100, 4, generator=g)
    with caplog.at_level(logging.WARNING, logger="longtail.evaluation.distribution"):
        report = distribution_report(real, torch.zeros(100), fake, torch.zeros(100), ["a"])
    assert report["overall"]["reliable"] and "reason" not in report["overall"] and caplog.text == ""
