"""Cheap guidance decoders: distillation from a tiny VAE, files, TAESD loading, use on the guidance path."""

import json

import pytest
import torch
from diffusers import AutoencoderTiny

from longtail.models.stable_diffusion import load_stable_diffusion
from longtail.models.surrogate import (
    SurrogateDecoder,
    distill_decoder,
    load_surrogate,
    load_tiny_autoencoder,
    reconstruction_error,
    save_surrogate,
    surrogate_config_for,
    surrogate_decode,
)
from longtail.sampling import GuidanceConfig, initial_latents, sample
from longtail.testing import write_tiny_stable_diffusion


@pytest.fixture(scope="module")
def ldm(tmp_path_factory):
    return load_stable_diffusion(write_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "m"))


def _images(n: int, generator: torch.Generator) -> torch.Tensor:
    coarse = torch.rand(n, 3, 4, 4, generator=generator) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False)


@pytest.mark.parametrize(("arch", "jacobian", "ratio"), [("taesd", 1.0, 0.5), ("conv", 0.0, 0.9)])
def test_distillation_reduces_the_error_and_round_trips(ldm, arch, jacobian, ratio, tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = _images(24, gen)
    held_out = ldm.encode(_images(8, gen)).detach()
    torch.manual_seed(0)
    untrained = SurrogateDecoder(surrogate_config_for(ldm, arch, channels=16))
    before = reconstruction_error(ldm, untrained, held_out)
    module = distill_decoder(
        ldm,
        images,
        steps=40,
        batch_size=8,
        lr=3e-3,
        arch=arch,
        channels=16,
        pool_size=16,
        jacobian_weight=jacobian,
    )
    after = reconstruction_error(ldm, module, held_out)
    assert after < ratio * before
    assert module.stats["mse_after"] < module.stats["mse_before"]
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    save_surrogate(module, tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "surrogate.json").read_text())
    assert meta["config"]["arch"] == arch and meta["config"]["upsample"] == 1
    assert meta["distill"]["jacobian_weight"] == jacobian
    again = load_surrogate(tmp_path / "s")
    z = torch.randn(2, 4, 32, 32)
    assert torch.equal(again(z), module(z))
    assert again.stats == pytest.approx(module.stats)


def test_distill_from_latents_and_missing_files(ldm, tmp_path):
    latents = torch.randn(8, 4, 32, 32)
    module = distill_decoder(ldm, latents, steps=2, batch_size=4, channels=8, predicted_fraction=0.0)
    assert module.stats["train_latents"] == 8
    assert module(latents[:1]).shape == (1, 3, 64, 64)
    with pytest.raises(FileNotFoundError, match=r"surrogate\.json is missing"):
        load_surrogate(tmp_path)


def test_surrogate_is_used_on_the_guidance_path_only(ldm):
    calls = []
    surrogate = SurrogateDecoder(surrogate_config_for(ldm, channels=8))
    guide = surrogate_decode(surrogate)
    base_forward = guide.forward

    def counted(z):
        calls.append(z.shape[0])
        return base_forward(z)

    guide.forward = counted
    torch.manual_seed(0)
    clf = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)
    )
    cond = ldm.encode_prompts(["a cat", "a dog"])
    z = initial_latents([0, 1], ldm.latent_shape)
    kw = dict(denoiser=ldm.denoise, scheduler=ldm.scheduler, decode=ldm.decode, cond=cond, latents=z,
              num_steps=2, classifier=clf, uncond=ldm.encode_prompts(["", ""]), cfg_scale=2.0)
    full = sample(guidance=GuidanceConfig("entropy", 100.0), **kw)
    cheap = sample(guidance=GuidanceConfig("entropy", 100.0), guide_decode=guide, **kw)
    assert calls == [2, 2]  # one call per guided step, none for the final images
    assert cheap.images.shape == full.images.shape == (2, 3, 64, 64)
    assert not torch.allclose(cheap.images, full.images)
    none = sample(guidance=GuidanceConfig("entropy", 0.0), guide_decode=guide, **kw)
    plain = sample(**kw)
    assert torch.allclose(none.images, plain.images, atol=1e-6)


def test_tiny_autoencoder_scaling(ldm, tmp_path):
    torch.manual_seed(0)
    taesd = AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    )
    taesd.save_pretrained(tmp_path / "taesd")
    decode = load_tiny_autoencoder(tmp_path / "taesd")
    assert decode.scaling_factor == 1.0  # TAESD reads the UNet's latents as they are
    z = torch.randn(2, 4, 32, 32)
    out = decode(z)
    assert out.shape == (2, 3, 64, 64)
    assert torch.allclose(out, taesd.decode(z).sample, atol=1e-6)
    # an AutoencoderKL as a guide decoder divides by its own scaling factor, exactly like ldm.decode
    assert torch.allclose(surrogate_decode(ldm.vae)(z), ldm.decode(z), atol=1e-6)
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        load_tiny_autoencoder(tmp_path)
