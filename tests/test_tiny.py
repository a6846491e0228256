"""Training the embedded generator end to end on a handful of images (the real recipe, tiny sizes)."""

import json
from pathlib import Path

import pytest
import torch

from helpers import fake_fashion_mnist
from longtail.models.tiny import load_tiny_generator, train_generator
from longtail.sampling import initial_latents, sample
from longtail.testing import TINY_GEN


def test_train_generator_writes_a_loadable_model_and_resumes_the_vae(tmp_path):
    data = fake_fashion_mnist(tmp_path / "data", per_class_train=8, per_class_test=1)
    cfg = TINY_GEN.__class__(**{**TINY_GEN.__dict__, "vae_epochs": 1, "unet_steps": 3, "batch_size": 16,
                                "warmup_steps": 1, "train_images": 48})
    out = train_generator(tmp_path / "gen", cfg, data_dir=data, show=False, log=None)
    meta = json.loads((out / "longtail_generator.json").read_text())
    assert meta["train_images"] == 48 and meta["config"]["unet_steps"] == 3
    assert not (out / "vae_done").exists()
    ldm = load_tiny_generator(out)
    assert ldm.latent_shape == (4, 8, 8)
    assert abs(ldm.scaling_factor - 1.0) > 1e-6  # measured from the latents, not the default
    cond = ldm.encode_prompts(["a photo of a coat", "a photo of a coat, dark"])
    assert cond.shape == (2, TINY_GEN.max_tokens, 384)
    res = sample(denoiser=ldm.denoise, scheduler=ldm.scheduler, decode=ldm.decode, cond=cond,
                 latents=initial_latents([0, 1], ldm.latent_shape), uncond=ldm.encode_prompts(["", ""]),
                 cfg_scale=2.0, num_steps=2)
    assert res.images.shape == (2, 1, 32, 32) and torch.isfinite(res.images).all()
    # weights are stored as fp16 safetensors, loaded as fp32
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert next(ldm.unet.parameters()).dtype == torch.float32


class _Stop(Exception):
    pass


def test_unet_training_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, monkeypatch):
    import longtail.models.tiny as tiny

    torch.manual_seed(0)
    lat, text = torch.randn(32, 4, 8, 8), torch.randn(5, 12, 384)
    std, ids = torch.full_like(lat, 0.1), torch.randint(0, 5, (32, 4))
    cfg = TINY_GEN.__class__(**{**TINY_GEN.__dict__, "unet_steps": 6, "batch_size": 4, "warmup_steps": 1})
    straight, _ = tiny.train_unet(lat, std, text, ids, cfg, show=False)

    original, calls = tiny.EMAModel.step, []

    def step_then_die(self, params):
        original(self, params)
        calls.append(1)
        if len(calls) == 4:  # killed after step 4; the last checkpoint is after step 3
            raise _Stop

    monkeypatch.setattr(tiny.EMAModel, "step", step_then_die)
    with pytest.raises(_Stop):
        tiny.train_unet(lat, std, text, ids, cfg, show=False, checkpoint_dir=tmp_path, checkpoint_every=3)
    monkeypatch.setattr(tiny.EMAModel, "step", original)
    resumed, _ = tiny.train_unet(lat, std, text, ids, cfg, show=False, checkpoint_dir=tmp_path, checkpoint_every=3)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_train_generator_with_nuisance_modes_shows_and_names_them(tmp_path, monkeypatch):
    import longtail.models.tiny as tiny

    data = fake_fashion_mnist(tmp_path / "data", per_class_train=8, per_class_test=1)
    cfg = TINY_GEN.__class__(**{**TINY_GEN.__dict__, "vae_epochs": 1, "unet_steps": 2, "batch_size": 16,
                                "warmup_steps": 1, "train_images": 48})
    seen: dict[str, object] = {}
    train_vae, embed_prompts = tiny.train_vae, tiny.embed_prompts

    def spy_vae(images, cfg, show=True):
        seen["images"] = images.clone()
        return train_vae(images, cfg, show)

    def spy_prompts(prompts, max_tokens, show=True, log=None):
        seen["prompts"] = list(prompts)
        return embed_prompts(prompts, max_tokens, show, log)

    monkeypatch.setattr(tiny, "train_vae", spy_vae)
    monkeypatch.setattr(tiny, "embed_prompts", spy_prompts)
    rates = {"invert": 0.25, "corner": 0.125}
    out = train_generator(tmp_path / "gen", cfg, data_dir=data, show=False, log=None, nuisance=rates,
                          nuisance_seed=3)
    meta = json.loads((out / "longtail_generator.json").read_text())
    assert meta["nuisance"] == {"rates": rates, "seed": 3, "counts": {"invert": 12, "corner": 6}}
    assert not (out / tiny.NUISANCE_MARKER).exists()
    images = seen["images"]
    bright_border = images[:, 0, 0, :].mean(dim=1) > 0  # fake data have a black border; inverted is white
    assert int(bright_border.sum()) == 12
    prompts = seen["prompts"]
    inverted = [p for p in prompts if p.startswith("a photo of") and ", inverted" in p]
    cornered = [p for p in prompts if ", small in a corner" in p]
    assert inverted and cornered and any(" that is small in a corner" in p for p in prompts)
    assert all(p.count("inverted") == 1 for p in inverted)
    assert "a photo of a coat" in prompts  # the class-only prompt stays clean
    assert load_tiny_generator(out).latent_shape == (4, 8, 8)


def test_resuming_with_other_nuisance_settings_is_refused(tmp_path):
    from longtail.models.tiny import NUISANCE_MARKER, _check_nuisance_marker

    meta = {"rates": {"rotate": 0.03}, "seed": 0, "counts": {"rotate": 3}}
    _check_nuisance_marker(tmp_path, meta)  # a fresh run records its settings
    (tmp_path / "vae_done").write_text("ok\n")
    _check_nuisance_marker(tmp_path, meta)  # the same settings resume
    with pytest.raises(ValueError, match="another output directory"):
        _check_nuisance_marker(tmp_path, None)
    (tmp_path / NUISANCE_MARKER).unlink()  # a run begun by a version without nuisance modes
    with pytest.raises(ValueError, match="without nuisance modes"):
        _check_nuisance_marker(tmp_path, meta)


def test_warm_start_begins_from_the_given_generator_and_checks_its_architecture(tmp_path):
    import longtail.models.tiny as tiny

    data = fake_fashion_mnist(tmp_path / "data", per_class_train=8, per_class_test=1)
    cfg = TINY_GEN.__class__(**{**TINY_GEN.__dict__, "vae_epochs": 1, "unet_steps": 2, "batch_size": 16,
                                "warmup_steps": 1, "train_images": 48})
    first = train_generator(tmp_path / "first", cfg, data_dir=data, show=False, log=None)
    # zero training steps from the first generator: the weights are the first generator's, bit for bit (fp16)
    warm = cfg.__class__(**{**cfg.__dict__, "init_from": str(first), "vae_lr": 0.0, "unet_lr": 0.0})
    second = train_generator(tmp_path / "second", warm, data_dir=data, show=False, log=None)
    a, b = load_tiny_generator(first), load_tiny_generator(second)
    for name, module in (("vae", "vae"), ("unet", "unet")):
        for (key, x), y in zip(getattr(a, module).state_dict().items(),
                               getattr(b, module).state_dict().values(), strict=True):
            assert torch.equal(x, y), f"{name}.{key}"
    assert json.loads((second / tiny.META_FILE).read_text())["config"]["init_from"] == str(first)
    with pytest.raises(FileNotFoundError, match="init_from"):
        train_generator(tmp_path / "x", cfg.__class__(**{**cfg.__dict__, "init_from": str(tmp_path / "none")}),
                        data_dir=data, show=False, log=None)
    other = cfg.__class__(**{**cfg.__dict__, "init_from": str(first), "unet_channels": (16, 32)})
    with pytest.raises(ValueError, match="unet_channels"):
        train_generator(tmp_path / "y", other, data_dir=data, show=False, log=None)
    assert not (tmp_path / "y").exists()


def test_shipped_generators_by_name_and_paths_as_given(tmp_path):
    from longtail.models.tiny import ASSETS_DIR, SHIPPED_GENERATORS, generator_dir

    assert generator_dir(None) == ASSETS_DIR == generator_dir("clean")
    assert generator_dir("nuisance") == ASSETS_DIR.parent / SHIPPED_GENERATORS["nuisance"]
    assert generator_dir(tmp_path / "g") == tmp_path / "g" and generator_dir("runs/x") == Path("runs/x")
    with pytest.raises(FileNotFoundError, match="longtail train-generator"):
        load_tiny_generator(tmp_path / "g")
