"""LoRA adaptation of Stable Diffusion (`longtail adapt-generator`) on a tiny random SD (nothing downloaded):
train a few steps, save, load through `generator.lora`, generate; an untrained adapter (B = 0) and a trained one
at scale 0 leave the images bit for bit as the base model's; a trained one at scale 1 changes them."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from longtail import cli
from longtail.config import ConfigError
from longtail.generate import generate, plan_jobs
from longtail.jobs.common import GeneratorSpec, load_generator
from longtail.models.lora import LORA_META, LORA_WEIGHTS, LoraTrainConfig, load_lora, train_lora
from longtail.testing import write_tiny_stable_diffusion

CLASSES = ("circle", "square")


def write_folder(root, per_class=3, size=40):
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.full((size, size, 3), 30, np.uint8)
            y, x = rng.integers(0, size // 2, 2)
            img[y : y + 12 + 6 * c, x : x + 12 + 6 * c] = (200, 80 * c, 40)
            Image.fromarray(img, "RGB").save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    sd = write_tiny_stable_diffusion(root / "sd")
    data = write_folder(root / "data")
    fast = LoraTrainConfig(rank=2, steps=3, lr=5e-2, batch_size=2, resolution=32, checkpoint_every=2)
    trained = train_lora(sd, data, root / "trained", fast, show=False, log=None)
    untrained = train_lora(sd, data, root / "untrained", LoraTrainConfig(rank=2, steps=0, resolution=32), show=False,
                           log=None)
    return {"sd": sd, "data": data, "trained": trained, "untrained": untrained, "fast": fast, "root": root}


def images(world, **spec):
    ldm, _, _ = load_generator(GeneratorSpec(kind="sd", model=str(world["sd"]), **spec), torch.device("cpu"))
    ldm.set_image_size(32, 32)
    jobs = plan_jobs([1, 1], lambda c, i: f"a photo of a {CLASSES[c]}")
    return generate(ldm, jobs, num_steps=2, cfg_scale=2.0, show=False).images


def test_adapter_files_in_diffusers_format_with_metadata(world):
    weights = load_file(str(world["trained"] / LORA_WEIGHTS))
    assert weights and all(k.startswith("unet.") for k in weights)
    ups = [v for k, v in weights.items() if "lora.up" in k or "lora_B" in k]
    assert ups and all(v.shape[1] == 2 for v in ups)  # rank 2
    untrained = load_file(str(world["untrained"] / LORA_WEIGHTS))
    assert untrained.keys() == weights.keys()
    assert all(torch.count_nonzero(v) == 0 for k, v in untrained.items() if "lora.up" in k or "lora_B" in k)
    assert any(torch.count_nonzero(v) > 0 for k, v in weights.items() if "lora.up" in k or "lora_B" in k)
    meta = json.loads((world["trained"] / LORA_META).read_text())
    assert meta["class_names"] == list(CLASSES) and meta["train_images"] == 6 and meta["config"]["steps"] == 3
    assert meta["prompt_template"] == GeneratorSpec().prompt_template
    assert not (world["trained"] / "checkpoint").exists()


def test_untrained_or_zero_scale_lora_is_bit_identical_to_the_base_and_a_trained_one_is_not(world):
    base = images(world)
    assert torch.equal(images(world, lora=str(world["untrained"])), base)  # B = 0 at scale 1: exact
    assert torch.equal(images(world, lora=str(world["trained"]), lora_scale=0.0), base)  # scale 0: exact
    adapted = images(world, lora=str(world["trained"] / LORA_WEIGHTS))
    assert torch.isfinite(adapted).all() and (adapted - base).abs().max() > 1e-3


def test_training_resumes_from_its_checkpoint_to_the_same_adapter(world, monkeypatch):
    import longtail.models.lora as lora

    out = world["root"] / "resumed"
    original, saves = lora._save_state, []

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        saves.append(1)
        raise KeyboardInterrupt  # killed right after the checkpoint at step 2

    monkeypatch.setattr(lora, "_save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_lora(world["sd"], world["data"], out, world["fast"], show=False, log=None)
    assert (out / "checkpoint" / "state.pt").is_file() and not (out / LORA_WEIGHTS).exists()
    monkeypatch.setattr(lora, "_save_state", original)
    with pytest.raises(ValueError, match="other settings \\(config differ"):
        train_lora(world["sd"], world["data"], out, LoraTrainConfig(**{**world["fast"].__dict__, "lr": 1e-3}),
                   show=False, log=None)
    train_lora(world["sd"], world["data"], out, world["fast"], show=False, log=None)
    a, b = load_file(str(out / LORA_WEIGHTS)), load_file(str(world["trained"] / LORA_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_cli_and_clear_errors(world, tmp_path):
    result = CliRunner().invoke(cli.app, ["adapt-generator", "--model", str(world["sd"]), "--data",
                                          str(world["data"]), "--out", str(tmp_path / "cli"), "--steps", "1",
                                          "--rank", "1", "--resolution", "32", "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / LORA_WEIGHTS).is_file() and "generator.lora=" in result.output
    result = CliRunner().invoke(cli.app, ["adapt-generator", "--model", str(world["sd"]), "--data",
                                          str(world["data"]), "--out", str(tmp_path / "x"), "--resolution", "30"])
    assert isinstance(result.exception, ConfigError)  # exit code 2 and this one line from `longtail`
    assert str(result.exception).startswith("resolution (--resolution) 30 is not a multiple of 4")
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ConfigError, match="is a StableDiffusionXLPipeline; adapt-generator trains LoRA for"):
        train_lora(sdxl, world["data"], tmp_path / "y", show=False, log=None)
    with pytest.raises(ConfigError, match="needs a local Stable Diffusion directory"):
        train_lora("org/model", world["data"], tmp_path / "y", show=False, log=None)
    ldm, _, _ = load_generator(GeneratorSpec(kind="sd", model=str(world["sd"])), torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="no LoRA weights"):
        load_lora(ldm.unet, tmp_path / "nowhere")
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"text_encoder.layer.lora.up.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(ValueError, match=r"bad\.safetensors"):
        load_lora(ldm.unet, bad)


def test_diffusers_pipeline_reads_the_adapter_as_we_apply_it(world):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(world["sd"], safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(world["trained"])
    ldm, _, _ = load_generator(GeneratorSpec(kind="sd", model=str(world["sd"]), lora=str(world["trained"])),
                               torch.device("cpu"))
    torch.manual_seed(0)
    z, t, text = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        ours, theirs = ldm.unet(z, t, text).sample, pipe.unet(z, t, text).sample
        plain = load_generator(GeneratorSpec(kind="sd", model=str(world["sd"])), torch.device("cpu"))[0].unet(
            z, t, text).sample
    assert torch.allclose(ours, theirs, atol=1e-6) and not torch.allclose(ours, plain, atol=1e-4)


def test_generate_job_takes_the_lora_setting(world, tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet", num_classes=2).state_dict(), str(tmp_path / "clf.safetensors"))
    (tmp_path / "names.json").write_text(json.dumps(list(CLASSES)))
    out = tmp_path / "gen"
    result = CliRunner().invoke(cli.app, [
        "generate", "--out", str(out), "--sd", str(world["sd"]), "--classifier", "timm:test_resnet",
        "--checkpoint", str(tmp_path / "clf.safetensors"), "--class-names", str(tmp_path / "names.json"),
        "--set", "classifier.num_classes=2", "--per-class", "1", "--steps", "2", "--weight", "0", "--device", "cpu",
        "--set", "generator_check.per_class=0", "--set", f"generator.lora={world['trained']}",
        "--set", "generator.lora_scale=0.5", "--no-progress"])
    assert result.exit_code == 0, result.output
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())["generator"]
    assert saved["lora"] == str(world["trained"]) and saved["lora_scale"] == 0.5
    assert len(list(out.rglob("*.png"))) == 2


def test_mine_names_a_missing_lora_or_vae_before_any_work(tmp_path):
    from longtail.config import ConfigError
    from longtail.jobs.mine import load_demo_config
    from longtail.jobs.mine_config import check_paths

    cfg = load_demo_config(overrides=[f"out={tmp_path}", f"generator.lora={tmp_path / 'no-lora'}",
                                      f"generator.vae={tmp_path / 'no-vae'}"])
    with pytest.raises(ConfigError, match=r"generator\.lora: .*no-lora does not exist\n  generator\.vae: .*no-vae"):
        check_paths(cfg)


def test_a_lora_of_another_base_model_is_one_line(world):
    """The tiny SD's adapter on the embedded generator's UNet (other widths): one line, not peft's list."""
    with pytest.raises(ValueError) as err:
        load_generator(GeneratorSpec(kind="embedded", lora=str(world["trained"])), torch.device("cpu"))
    message = str(err.value)
    assert "do not fit this generator's denoiser" in message and "\n" not in message and len(message) < 600
