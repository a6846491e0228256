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
    assert found - SAFETENSORS_PENDING == {("files.py", "load_checkpoint"), ("files.py", "safetensors_metadata"),
                                                   ("files.py", "safetensors_shapes")}


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


def test_evaluate_json_is_strict_and_without_counts_the_rare_auroc_is_null_with_its_reason(evaluated):
    saved = json.loads(evaluated["text"], parse_constant=reject)  # no NaN / Infinity anywhere
    entropy = saved["detection"]["entropy"]
    assert entropy["auroc_rare"] is None
    assert entropy["auroc_rare_reason"].startswith("no training counts given (--train or counts_file)")
    assert not {"many", "medium", "few"} & set(saved["accuracy"])
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


# --- 8. a synthetic store that survives any kill ------------------------------------------------------------

STORE_LOG = "longtail.data.store"


def store_records(ids: list[str], cls: str = "coat") -> list[dict]:
    return [{"id": i, "class_name": cls, "class_id": 0, "index": n, "seed": 1000 + n, "signal": "0.123456",
             "round": 1, "seconds": "0.5000"} for n, i in enumerate(ids)]


def good_store(root: Path, ids: tuple[str, ...] = ("c0_00000", "c0_00001", "c0_00002")) -> Path:
    from longtail.data.store import SyntheticStore

    SyntheticStore(root).add(np.zeros((len(ids), 4, 4), np.uint8), store_records(list(ids)))
    return root / "manifest.csv"


def damage(manifest: Path, kind: str) -> None:
    """Each way a kill (or a lost file) leaves a manifest."""
    text = manifest.read_bytes()
    if kind == "zero_bytes":
        manifest.write_bytes(b"")
    elif kind == "cut_header":
        manifest.write_bytes(text[:20])
    elif kind == "cut_row_mid_number":  # the last row stops inside its seconds value "0.5000"
        manifest.write_bytes(text[: text.rstrip().rfind(b"0.5000") + 3])
    elif kind == "id_only_row":
        manifest.write_bytes(text + b"c0_00003\r\n")
    elif kind == "cut_id_then_glued":  # the old writer appended the row again onto its cut start "c0_0"
        head, last = text.rstrip(b"\r\n").rsplit(b"\r\n", 1)
        manifest.write_bytes(head + b"\r\nc0_0" + last + b"\r\n")
    elif kind == "missing_image":
        (manifest.parent / "coat" / "c0_00001.png").unlink()


@pytest.mark.parametrize(("kind", "kept", "message"), [
    ("zero_bytes", [], "manifest.csv: empty: no header"),
    ("cut_header", [], "manifest.csv: cut header 'id,path,class_id,cla' (no line end"),
    ("cut_row_mid_number", ["c0_00000", "c0_00001"], "manifest.csv: line 4 (id c0_00002) dropped: cut short"),
    ("id_only_row", ["c0_00000", "c0_00001", "c0_00002"],
     "manifest.csv: line 5 (id c0_00003) dropped: 1 field where the header has 19"),
    ("cut_id_then_glued", ["c0_00000", "c0_00001"],
     "manifest.csv: line 4 (id c0_0c0_00002) dropped: path 'coat/c0_00002.png' is not its id's image"),
    ("missing_image", ["c0_00000", "c0_00002"],
     "manifest.csv: line 3 (id c0_00001) dropped: its image coat/c0_00001.png is missing"),
])
def test_a_damaged_manifest_keeps_exactly_its_good_rows_with_one_warning(tmp_path, caplog, kind, kept, message):
    """OLD: 0 bytes -> KeyError: 'id' once rows were appended; cut header -> the next rows glued onto it; cut
    row -> kept with empty columns and seconds '0.5'; id-only row -> TypeError; missing image -> silent."""
    from longtail.data.store import SyntheticStore

    manifest = good_store(tmp_path)
    damage(manifest, kind)
    with caplog.at_level(logging.WARNING, logger=STORE_LOG):
        rows = SyntheticStore(tmp_path).rows()
        SyntheticStore(tmp_path).rows()  # read again: no second warning
    assert [r["id"] for r in rows] == kept
    assert all(r["seconds"] == "0.5000" and r["seed"].isdigit() for r in rows)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and message in warnings[0] and str(manifest) in warnings[0]


@pytest.mark.parametrize("kind", ["zero_bytes", "cut_header"])
def test_a_manifest_without_a_good_header_is_set_aside_not_appended_to(tmp_path, caplog, kind):
    from longtail.data.store import SyntheticStore

    manifest = good_store(tmp_path)
    damage(manifest, kind)
    damaged = manifest.read_bytes()
    with caplog.at_level(logging.WARNING, logger=STORE_LOG):
        store = SyntheticStore(tmp_path)
        assert store.add(np.zeros((2, 4, 4), np.uint8), store_records(["c0_00000", "c0_00001"])) == 2
        store.add(np.zeros((1, 4, 4), np.uint8), store_records(["c0_00002"]))
        assert SyntheticStore(tmp_path).merge() == 3
    with manifest.open(newline="") as f:
        header = next(iter(f))
    assert header.startswith("id,path,class_id,class_name,index,seed,prompt,prompt_full,")
    assert [r["class_name"] for r in SyntheticStore(tmp_path).rows()] == ["coat"] * 3  # no column lost
    aside = tmp_path / "manifest.csv.damaged"
    assert aside.is_file() == (kind == "cut_header") and (kind == "zero_bytes" or aside.read_bytes() == damaged)
    assert ("set aside as manifest.csv.damaged" if kind == "cut_header" else "replaced") in caplog.text


def test_a_kill_before_the_header_is_in_place_leaves_no_manifest(tmp_path, monkeypatch):
    """The header is written to a temporary file and renamed: killed before the rename, there is no manifest
    (OLD: a 0-byte manifest.csv, and every later run crashed with KeyError: 'id')."""
    from longtail.data import store as store_module

    def killed(*_):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(store_module.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            store_module.SyntheticStore(tmp_path).add(np.zeros((1, 4, 4), np.uint8), store_records(["c0_00000"]))
    assert not (tmp_path / "manifest.csv").exists()
    good_store(tmp_path)
    assert [r["id"] for r in store_module.SyntheticStore(tmp_path).rows()] == ["c0_00000", "c0_00001", "c0_00002"]


def test_a_cut_row_is_removed_before_appending_so_nothing_is_glued_to_it(tmp_path):
    from longtail.data.store import SyntheticStore

    manifest = good_store(tmp_path)
    damage(manifest, "cut_row_mid_number")
    SyntheticStore(tmp_path).add(np.zeros((1, 4, 4), np.uint8), store_records(["c0_00009"]))
    rows = SyntheticStore(tmp_path).rows()
    assert [r["id"] for r in rows] == ["c0_00000", "c0_00001", "c0_00009"]
    assert manifest.read_bytes().count(b"\r\n") == 4 and not list(tmp_path.glob(".*.tmp"))


def test_a_manifest_without_prompt_full_is_read_and_upgraded_on_append(tmp_path):
    from longtail.data.store import COLUMNS, SyntheticStore

    old = [c for c in COLUMNS if c != "prompt_full"]
    png(tmp_path / "coat" / "a.png")
    (tmp_path / "manifest.csv").write_text(",".join(old) + "\r\n" + "a,coat/a.png,0,coat" + "," * (len(old) - 4)
                                           + "\r\n")
    store = SyntheticStore(tmp_path)
    assert [(r["id"], r["prompt_full"]) for r in store.rows()] == [("a", "")]
    store.add(np.zeros((1, 4, 4), np.uint8), [{"id": "b", "class_name": "coat", "prompt": "p", "prompt_full": "pq"}])
    rows = SyntheticStore(tmp_path).rows()
    assert [(r["id"], r["prompt_full"]) for r in rows] == [("a", ""), ("b", "pq")]


@pytest.fixture(scope="module")
def tiny_ldm(tmp_path_factory):
    from longtail.models.tiny import load_tiny_generator
    from longtail.testing import tiny_generator

    return load_tiny_generator(tiny_generator(tmp_path_factory.mktemp("gen")))  # text limit: 12 tokens


def test_generate_dataset_regenerates_exactly_the_dropped_rows(tmp_path, tiny_ldm, caplog):
    from longtail.data.store import SyntheticStore
    from longtail.generate import generate_dataset, plan_jobs

    jobs = plan_jobs([4], lambda c, i: "a photo of a coat")
    kw = dict(meta={"round": 1}, num_steps=1, cfg_scale=1.0, show=False)
    assert generate_dataset(tiny_ldm, jobs, tmp_path, ["coat"], **kw)["written"] == 4
    manifest = tmp_path / "manifest.csv"
    before = {r["id"]: r for r in SyntheticStore(tmp_path).rows()}
    pixels = (tmp_path / "coat" / "c0_00002.png").read_bytes()
    lines = manifest.read_bytes().decode().split("\r\n")
    lines[2] = "c0_00001"  # reduced to its id
    (tmp_path / "coat" / "c0_00002.png").unlink()  # its image gone
    manifest.write_bytes("\r\n".join(lines).rstrip("\r\n")[:-3].encode())  # the last row cut inside its seconds
    with caplog.at_level(logging.WARNING, logger=STORE_LOG):
        assert [r["id"] for r in SyntheticStore(tmp_path).rows()] == ["c0_00000"]
        stats = generate_dataset(tiny_ldm, jobs, tmp_path, ["coat"], **kw)
    assert (stats["skipped"], stats["written"]) == (1, 3)
    after = {r["id"]: r for r in SyntheticStore(tmp_path).rows()}
    assert sorted(after) == sorted(before)
    assert all(after[i]["seed"] == before[i]["seed"] and after[i]["path"] == before[i]["path"] for i in after)
    assert (tmp_path / "coat" / "c0_00002.png").read_bytes() == pixels  # the same image, made again
    assert caplog.text.count("dropped") == 3


# --- 9. a damaged mining round ------------------------------------------------------------------------------


def mining_run(root: Path, model: torch.nn.Module, rounds: int = 3, log: list | None = None) -> list[dict]:
    from longtail.mining import MiningConfig, mine

    log = [] if log is None else log

    def synthesize(r, m, counts, store):
        n = sum(counts)
        log.append(("synthesize", r))
        store.add(np.full((n, 4, 4), r, np.uint8),
                  [{"id": f"r{r}_{i}", "class_name": "a", "round": r} for i in range(n)])

    def finetune(m, rows, r):
        log.append(("finetune", r, len(rows)))
        with torch.no_grad():
            m.fc.weight.add_(1.0)
        return [0.5]

    return mine(model, synthesize, finetune, lambda m: {"top1": float(m.fc.weight.detach().mean())},
                MiningConfig(rounds=rounds, images_per_round=4), [1, 1], root)


def test_a_truncated_round_checkpoint_is_redone_from_the_last_good_round(tmp_path, tiny_cnn, caplog):
    """OLD: WeightsError: round checkpoint .../round_2/classifier.safetensors could not be read with safetensors
    (SafetensorError: Error while deserializing header: invalid header length); ..."""
    import copy

    start = copy.deepcopy(tiny_cnn)
    first = mining_run(tmp_path, tiny_cnn)
    ckpt = tmp_path / "round_2" / "classifier.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    log: list = []
    with caplog.at_level(logging.WARNING, logger="longtail.mining"):
        again = mining_run(tmp_path, copy.deepcopy(start), log=log)
    assert [e for e in log if e[0] == "finetune"] == [("finetune", 2, 8), ("finetune", 3, 12)]
    assert again == first  # round 2 redone from round 1's weights gives the same numbers
    assert ("round_2: classifier.safetensors unreadable (SafetensorError: Error while deserializing header"
            in caplog.text) and "redoing rounds 2 and 3 from round 1" in caplog.text
    mining_run(tmp_path, copy.deepcopy(start), log=(quiet := []))
    assert quiet == []  # repaired: nothing redone


def test_damaged_round_metrics_are_redone_and_dropped_images_of_a_finished_round_made_again(tmp_path, tiny_cnn,
                                                                                           caplog):
    import copy

    start = copy.deepcopy(tiny_cnn)
    mining_run(tmp_path, tiny_cnn)
    (tmp_path / "round_3" / "metrics.json").write_text('{"round": 3, "top1"')
    (tmp_path / "synthetic" / "a" / "r1_2.png").unlink()
    log: list = []
    with caplog.at_level(logging.WARNING):
        mining_run(tmp_path, copy.deepcopy(start), log=log)
    assert log == [("synthesize", 1), ("synthesize", 3), ("finetune", 3, 12)]
    assert "round 1 lacks 1 synthetic image(s); making them again with the classifier of round 0" in caplog.text
    assert "round_3: metrics.json unreadable (JSONDecodeError" in caplog.text


# --- 10. longtail verify ------------------------------------------------------------------------------------


def test_verify_reports_what_a_rerun_redoes_and_exits_1(tmp_path, tiny_cnn):
    from typer.testing import CliRunner

    from longtail.cli import app

    run = tmp_path / "run"
    mining_run(run, tiny_cnn)
    good = CliRunner().invoke(app, ["verify", str(run)])
    assert good.exit_code == 0, good.output
    assert f"{run / 'synthetic'}: 12 images listed and present" in good.output
    assert f"{run}: rounds 0, 1, 2, 3 intact" in good.output and "intact: a re-run redoes nothing" in good.output

    ckpt = run / "round_2" / "classifier.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    (run / "synthetic" / "a" / "r1_0.png").unlink()
    (run / "synthetic" / "manifest.part-1.csv").write_text("id,path,cl")
    before = sorted(p.name for p in (run / "synthetic").iterdir())
    bad = CliRunner().invoke(app, ["verify", str(run)])
    assert bad.exit_code == 1
    lines = bad.output.splitlines()
    assert lines == [
        f"{run / 'synthetic' / 'manifest.csv'}: line 2 (id r1_0) dropped: its image a/r1_0.png is missing; a re-run "
        "that needs it makes it again",
        f"{run / 'synthetic' / 'manifest.part-1.csv'}: cut header 'id,path,cl' (no line end: killed while writing "
        "it); a re-run sets it aside as manifest.part-1.csv.damaged and makes its images again",
        f"{run / 'synthetic'}: 11 images listed and present",
        f"{run / 'round_2'}: classifier.safetensors unreadable (SafetensorError: Error while deserializing header: "
        "invalid header length); a re-run redoes rounds 2 and 3 from round 1",
        "3 problem(s): a re-run redoes what is listed above",
    ]
    assert sorted(p.name for p in (run / "synthetic").iterdir()) == before  # verify changes nothing
    store_only = CliRunner().invoke(app, ["verify", str(run / "synthetic")])
    assert store_only.exit_code == 1 and "2 problem(s)" in store_only.output
    from longtail.data.datasets import DataError

    (tmp_path / "empty").mkdir()
    nothing = CliRunner().invoke(app, ["verify", str(tmp_path / "empty")])  # main() turns it into exit 2
    assert isinstance(nothing.exception, DataError) and "is neither a synthetic store nor a run" in str(
        nothing.exception)


# --- 11. prompts over the text encoder's limit ---------------------------------------------------------------


def test_a_prompt_over_the_token_limit_is_warned_once_and_recorded_as_seen(tiny_ldm, caplog):
    """OLD: no warning; two prompts differing after the limit gave byte-identical images while the manifest
    recorded both full prompts."""
    from longtail.generate import Job, generate, records

    base = "a photo of a coat that is dark, tall and tilted left with a"
    red, blue = base + " red collar", base + " blue collar"
    assert tiny_ldm.max_length == 12 and tiny_ldm.count_tokens(red) > 12
    jobs = [Job(0, 0, 7, red), Job(0, 1, 7, blue), Job(0, 2, 7, "a photo of a coat")]
    with caplog.at_level(logging.WARNING, logger="longtail.models.ldm"):
        gen = generate(tiny_ldm, jobs, num_steps=1, cfg_scale=1.0, show=False)
        generate(tiny_ldm, jobs[:2], num_steps=1, cfg_scale=1.0, show=False)
    # the encoder never saw the difference (same embedding; the images agree up to the batch row's float rounding,
    # which differs between rows with some thread settings) ...
    assert torch.equal(tiny_ldm.encode_prompts([red]), tiny_ldm.encode_prompts([blue]))
    assert torch.allclose(gen.images[0], gen.images[1], atol=1e-5)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("over the text encoder's limit of 12" in w for w in warnings)  # ... now said
    assert any("red collar" in w for w in warnings) and any("blue collar" in w for w in warnings)
    rows = records(gen, ["coat"], {})
    seen = rows[0]["prompt"]
    assert rows[1]["prompt"] == seen and red.startswith(seen) and tiny_ldm.count_tokens(seen) <= 12
    assert [r["prompt_full"] for r in rows] == [red, blue, ""] and rows[2]["prompt"] == "a photo of a coat"


def test_template_prompts_keep_within_a_token_limit_when_told_one():
    from longtail.introspection.keywords import Keyword, KeywordPair
    from longtail.introspection.prompts import refine_prompts, template_prompt

    words = ["dark", "tall", "tilted left", "blurry"]
    assert template_prompt("coat", words) == "a photo of a coat that is dark, tall, tilted left and blurry"
    assert template_prompt("coat", words, max_tokens=12) == "a photo of a coat that is dark and tall"
    assert template_prompt("coat", words, max_tokens=3) == "a photo of a coat"  # the class phrase stays
    assert template_prompt("coat", words, 9, count_tokens=lambda p: len(p.split())) == "a photo of a coat that is dark"
    pair = KeywordPair(0, "a photo of a coat, dark, tall", (Keyword("dark", 1.0), Keyword("tall", 0.9)), 0.95)
    [llm] = refine_prompts([pair], "coat", lambda _: "A photo of a coat that is very very dark and also tall",
                           max_tokens=12)
    assert llm.backend == "template" and llm.prompt == "a photo of a coat that is dark and tall"
    assert "15 tokens, more than the generator's limit of 12" in llm.error


def test_generator_training_captions_over_the_limit_are_named_not_cut_silently():
    from longtail.models.tiny import embed_prompts, load_minilm, prompts_over_limit

    tokenizer, _ = load_minilm()
    short, long = "a photo of a coat", "a photo of a coat, " + ", ".join(["rotated, faint, blurry"] * 6)
    assert prompts_over_limit([short, long], 32, tokenizer) == [long]
    assert prompts_over_limit([short, long], 512, tokenizer) == []
    said: list[str] = []
    emb = embed_prompts([short, long], 32, show=False, log=said.append)
    assert emb.shape == (2, 32, 384)
    assert len(said) == 1 and "1 of 2 prompts are over the text encoder's limit of 32 tokens" in said[0]
    said.clear()
    embed_prompts([short], 32, show=False, log=said.append)
    assert said == []


# --- 12. class names that collide as folders ------------------------------------------------------------------


def test_class_names_that_share_a_folder_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    """OLD: `longtail generate` with classes 't shirt' and 't_shirt' wrote both into t_shirt/ and exited 0."""
    from longtail.config import ConfigError
    from longtail.data.store import SyntheticStore, check_class_folders
    from longtail.generate import generate_dataset, plan_jobs
    from longtail.jobs import generate as job
    from longtail.jobs.common import ClassifierSpec, GeneratorSpec

    message = r"class names 't shirt' and 't_shirt' would both be written to the folder t_shirt/"
    with pytest.raises(ValueError, match=message):
        generate_dataset(None, plan_jobs([1, 1], lambda c, i: "p"), tmp_path / "a", ["t shirt", "t_shirt"], meta={})
    with pytest.raises(ValueError, match=r"'Coat' and 'coat' would both .* on a case-insensitive file system"):
        check_class_folders(["Coat", "bag", "coat"])
    check_class_folders(["T-shirt/top", "Shirt", "ankle boot"])
    store = SyntheticStore(tmp_path / "b")
    store.add(np.zeros((1, 4, 4), np.uint8), [{"id": "x", "class_name": "t shirt"}])
    with pytest.raises(ValueError, match=message):
        store.add(np.zeros((1, 4, 4), np.uint8), [{"id": "y", "class_name": "t_shirt"}])
    assert [r["id"] for r in SyntheticStore(tmp_path / "b").rows()] == ["x"]

    names = tmp_path / "names.json"
    names.write_text(json.dumps(["t shirt", "t_shirt"]))
    monkeypatch.setattr(job, "load_generator", lambda *_: (None, None, []))
    cfg = job.GenerateConfig(out=str(tmp_path / "out"), generator=GeneratorSpec(kind="sd", model="x"),
                             classifier=ClassifierSpec(class_names=str(names)), device="cpu")
    with pytest.raises(ConfigError, match=message):
        job.run_generate(cfg, show=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "a").exists()


def test_paths_given_beside_a_classifier_json_stay_relative_to_the_working_directory(tmp_path, monkeypatch):
    from longtail.jobs.common import ClassifierSpec, resolve_classifier_spec

    root = tmp_path / "clf"
    root.mkdir()
    (root / "classifier.json").write_text(json.dumps({"spec": "m:f", "checkpoint": "w.safetensors",
                                                      "heads": "h.safetensors"}))
    monkeypatch.chdir(tmp_path)
    spec = resolve_classifier_spec(ClassifierSpec(spec="clf/classifier.json", heads="other/h2.safetensors"))
    assert spec.checkpoint == str(Path("clf") / "w.safetensors")  # the file's own path: relative to the file
    assert spec.heads == "other/h2.safetensors"  # the given one: relative to where the user is, not clf/
