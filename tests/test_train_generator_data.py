"""`longtail train-generator --data DIR`: the embedded generator trained on any ImageFolder (tiny sizes), its
defaults from the data, captions and unlabeled images, warm starts, resuming, and loading wherever a generator
is accepted."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from longtail import cli
from longtail.config import ConfigError
from longtail.data.datasets import DataError
from longtail.generate import generate, plan_jobs
from longtail.jobs.common import GeneratorSpec, check_generator_classes, load_generator
from longtail.models import tiny
from longtail.prompts import prompt_table
from longtail.testing import TINY_GEN

FAST = {"vae_epochs": 1, "unet_steps": 2, "batch_size": 4, "warmup_steps": 1}


def tiny_cfg(**kw) -> tiny.TinyGeneratorConfig:
    return TINY_GEN.__class__(**{**TINY_GEN.__dict__, **FAST, **kw})


def write_images(root, sizes, mode="RGB", classes=("cat", "dog")):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, (w, h) in enumerate(sizes):
            shape = (h, w, 3) if mode == "RGB" else (h, w)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / name / f"{i}.png")
    return root


def invoke(*args):
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def test_the_trainer_prompts_as_every_job_does():
    for name in ("eight", "coat", "ankle boot", "umbrella"):
        assert tiny.class_prompt(name) == prompt_table([name], GeneratorSpec().prompt_template)[0][0]
    assert tiny.class_prompt("eight") == "a photo of an eight"


def test_colour_folder_with_captions_and_unlabeled_images_loads_wherever_a_generator_is_accepted(tmp_path, monkeypatch):
    data = write_images(tmp_path / "data", [(18, 18), (25, 21), (30, 30)])  # shorter sides 18, 21, 30
    unlabeled = write_images(tmp_path / "more", [(20, 20)], classes=("a", "b/deeper"))
    (tmp_path / "captions.csv").write_text('file_name,text\ncat/0.png,"a photo of a cat, asleep"\n'
                                           f"{data / 'dog' / '2.png'},a dog on grass\n")
    seen = {}
    train_vae, embed_prompts = tiny.train_vae, tiny.embed_prompts
    monkeypatch.setattr(tiny, "train_vae", lambda images, cfg, show=True: seen.setdefault("vae", images) is None
                        or train_vae(images, cfg, show))
    monkeypatch.setattr(tiny, "embed_prompts", lambda prompts, n, show=True, log=None: seen.setdefault(
        "prompts", list(prompts)) and embed_prompts(prompts, n, show, log))
    out = tiny.train_generator_folder(tmp_path / "gen", data, tiny_cfg(), captions=tmp_path / "captions.csv",
                                      unlabeled=unlabeled, show=False, log=None)
    # 3 channels (RGB files), median shorter side 21 rounded to a multiple of 8: 24
    assert seen["vae"].shape == (6 + 2, 3, 24, 24) and seen["vae"].dtype == torch.uint8
    assert seen["prompts"] == ["", "a photo of a cat", "a photo of a cat, asleep", "a photo of a dog",
                               "a dog on grass"]
    meta = json.loads((out / tiny.META_FILE).read_text())
    assert (meta["class_names"], meta["channels"], meta["image_size"]) == (["cat", "dog"], 3, 24)
    assert meta["data"] == {"train": str(data.resolve()), "counts": {"cat": 3, "dog": 3}, "captions": 2,
                            "unlabeled": 2}
    assert meta["prompt_template"] == GeneratorSpec().prompt_template and meta["train_images"] == 6
    assert not any((out / name).exists() for name in ("vae_done", tiny.DATA_MARKER, "unet_checkpoint"))

    spec = GeneratorSpec(kind="embedded", model=str(out))
    ldm, _, known = load_generator(spec, torch.device("cpu"))
    assert known == ["cat", "dog"] and ldm.image_size == (24, 24)
    check_generator_classes(spec, known, ["dog", "cat"])
    with pytest.raises(ConfigError, match=r"cannot draw \['bird'\]"):
        check_generator_classes(spec, known, ["cat", "bird"])
    images = generate(ldm, plan_jobs([1, 1], lambda c, i: tiny.class_prompt(known[c])), num_steps=2, cfg_scale=2.0,
                      show=False).images
    assert images.shape == (2, 3, 24, 24) and torch.isfinite(images).all()


def test_bad_inputs_are_named_before_any_training(tmp_path):
    data = write_images(tmp_path / "data", [(16, 16)], mode="L")
    with pytest.raises(ConfigError, match=r"image_size \(--size\) 30 is not a multiple of 8 .*; try 24 or 32"):
        tiny.train_generator_folder(tmp_path / "g", data, tiny_cfg(image_size=30), show=False, log=None)
    with pytest.raises(ConfigError, match=r"must be 1 .* or 3"):
        tiny.train_generator_folder(tmp_path / "g", data, tiny_cfg(channels=2), show=False, log=None)
    for text, match in (("path,caption\ncat/9.png,x\n", r"captions.csv:2: 'cat/9.png' is not an image"),
                        ("path,caption\ncat/0.png,x\ncat/0.png,y\n", r":3: 'cat/0.png' has a caption already"),
                        ("image,caption\ncat/0.png,x\n", r"needs a column 'path' or 'file_name'"),
                        ("path,caption\ncat/0.png,\n", "is empty")):
        (tmp_path / "captions.csv").write_text(text)
        with pytest.raises(DataError, match=match):
            tiny.train_generator_folder(tmp_path / "g", data, tiny_cfg(), captions=tmp_path / "captions.csv",
                                        show=False, log=None)
    # the shipped generators are 1-channel 32 px with the default architecture
    default = {"vae_epochs": 0, "init_from": "clean"}
    rgb = write_images(tmp_path / "rgb", [(32, 32)])
    with pytest.raises(ValueError, match=r"has channels=1, this configuration 3 \(its images have"):
        tiny.train_generator_folder(tmp_path / "g", rgb, tiny.TinyGeneratorConfig(**default), show=False, log=None)
    with pytest.raises(ValueError, match=r"has image_size=32, this configuration 16 \(it was trained at that size"):
        tiny.train_generator_folder(tmp_path / "g", data, tiny.TinyGeneratorConfig(**default), show=False, log=None)
    assert not (tmp_path / "g").exists()
    result = CliRunner().invoke(cli.app, ["train-generator", "--out", str(tmp_path / "g"), "--captions", "c.csv"])
    assert isinstance(result.exception, ConfigError) and "--captions needs --data" in str(result.exception)


def test_warm_start_from_the_shipped_weights_on_a_folder(tmp_path):
    """--init clean with zero learning rate: the result is the shipped generator, bit for bit (fp16)."""
    data = write_images(tmp_path / "data", [(28, 28), (28, 28)], mode="L")  # median 28 -> 32 px
    out = tmp_path / "gen"
    invoke("train-generator", "--data", data, "--out", out, "--init", "clean", "--set", "vae_epochs=0",
           "--set", "unet_steps=1", "--set", "unet_lr=0", "--set", "batch_size=2", "--set", "warmup_steps=0",
           "--no-progress")
    ours, shipped = tiny.load_tiny_generator(out), tiny.load_tiny_generator("clean")
    for part in ("vae", "unet"):
        for (key, a), b in zip(getattr(ours, part).state_dict().items(),
                               getattr(shipped, part).state_dict().values(), strict=True):
            assert torch.equal(a, b), f"{part}.{key}"
    meta = json.loads((out / tiny.META_FILE).read_text())
    assert meta["class_names"] == ["cat", "dog"] and meta["config"]["init_from"] == "clean"


class _Stop(Exception):
    pass


def test_a_killed_run_resumes_and_other_settings_are_refused(tmp_path, monkeypatch):
    data = write_images(tmp_path / "data", [(16, 16), (16, 16)], mode="L")
    train_unet = tiny.train_unet

    def die(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(tiny, "train_unet", die)
    with pytest.raises(_Stop):
        tiny.train_generator_folder(tmp_path / "gen", data, tiny_cfg(), show=False, log=None)
    assert (tmp_path / "gen" / "vae_done").is_file()
    with pytest.raises(ValueError, match=r"other settings \(config differ"):
        tiny.train_generator_folder(tmp_path / "gen", data, tiny_cfg(unet_steps=5), show=False, log=None)
    monkeypatch.setattr(tiny, "train_unet", train_unet)
    lines = []
    tiny.train_generator_folder(tmp_path / "gen", data, tiny_cfg(), show=False, log=lines.append)
    assert any(line.startswith("reusing the VAE") for line in lines)
    assert json.loads((tmp_path / "gen" / tiny.META_FILE).read_text())["image_size"] == 16
