"""Training the embedded generator end to end on a handful of images (the real recipe, tiny sizes)."""

import json

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
