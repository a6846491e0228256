"""Cross-attention keys / values once per sampling call (longtail.models.text_kv): same outputs, fewer projections,
and a fresh projection whenever the text, the weights or the need for gradients changes."""

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from longtail.models.text_kv import TextKVProcessor, clear_text_kv, install_text_kv
from longtail.sampling import sample


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=2, norm_num_groups=4,
    ).eval()


def count_key_projections(unet: UNet2DConditionModel) -> list[int]:
    """A counter of cross-attention to_k calls (hooks on every attn2.to_k)."""
    calls = [0]
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_k"):
            module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.fixture
def pair():
    """A plain UNet and a copy with TextKVProcessor, same weights."""
    plain, cached = tiny_unet(), tiny_unet()
    assert install_text_kv(cached)
    return plain, cached


def call(unet, z, text, t=500):
    return unet(z, torch.full((z.shape[0],), t), encoder_hidden_states=text).sample


def test_installed_processors_are_text_kv(pair):
    _, cached = pair
    assert all(isinstance(p, TextKVProcessor) for p in cached.attn_processors.values())


def test_outputs_are_bit_identical_and_keys_are_projected_once_per_text(pair):
    plain, cached = pair
    calls = count_key_projections(cached)
    layers = sum(name.endswith("attn2.to_k") for name, _ in cached.named_modules())
    assert layers == 7  # down 1 + 1, mid 1, up 2 + 2 (an up block has layers_per_block + 1)
    text, z = torch.randn(3, 5, 12), torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        for t in (900, 500, 100):
            assert torch.equal(call(cached, z, text, t), call(plain, z, text, t))
            assert calls[0] == layers  # the first call projected; later calls with the same tensor reuse
        other = text.clone()  # equal values, another tensor: projected again
        assert torch.equal(call(cached, z, other), call(plain, z, other))
        assert calls[0] == 2 * layers


def test_text_changed_in_place_is_projected_again(pair):
    plain, cached = pair
    text, z = torch.randn(2, 5, 12), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        call(cached, z, text)
        text.mul_(-2.0)
        assert torch.equal(call(cached, z, text), call(plain, z, text))


def test_weights_changed_in_place_are_projected_again(pair):
    plain, cached = pair
    text, z = torch.randn(2, 5, 12), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        call(cached, z, text)
        for unet in (plain, cached):  # an optimizer-like in-place update of every key projection
            for name, module in unet.named_modules():
                if name.endswith("attn2.to_k"):
                    module.weight.add_(0.5)
        assert torch.equal(call(cached, z, text), call(plain, z, text))


def test_training_gets_no_cache_and_its_gradients(pair):
    plain, cached = pair
    text, z = torch.randn(2, 5, 12), torch.randn(2, 4, 8, 8)
    grads = []
    for unet in (plain, cached):
        unet.zero_grad()
        for _ in range(2):  # the same text twice: a cache would make the second backward fail or differ
            call(unet, z, text).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None]))
    assert torch.equal(grads[0], grads[1])
    assert all(p._entry is None for p in cached.attn_processors.values())


def test_gradient_to_the_latents_through_cached_keys(pair):
    """Guidance through the denoiser: the latent needs a gradient, the text projections do not."""
    plain, cached = pair
    for unet in (plain, cached):
        unet.requires_grad_(False)
    text = torch.randn(2, 5, 12)
    grads = []
    for unet in (plain, cached):
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        for _ in range(2):
            call(unet, z, text).square().sum().backward()
        grads.append(z.grad)
    assert torch.equal(grads[0], grads[1])


def test_a_custom_processor_is_left_alone():
    unet = tiny_unet()
    unet.set_attn_processor(AttnProcessor())
    assert not install_text_kv(unet)
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())


def test_a_lora_layer_is_not_cached():
    pytest.importorskip("peft")
    from peft import LoraConfig

    plain, cached = tiny_unet(), tiny_unet()
    install_text_kv(cached)
    for unet in (plain, cached):
        torch.manual_seed(1)  # the same random (non-zero) LoRA weights on both
        unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_k", "to_v"]))
    text, z = torch.randn(2, 5, 12), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(call(cached, z, text), call(plain, z, text))
        assert all(p._entry is None for p in cached.attn_processors.values())


def test_clear_drops_the_cache(pair):
    _, cached = pair
    with torch.no_grad():
        call(cached, torch.randn(1, 4, 8, 8), torch.randn(1, 5, 12))
    assert any(p._entry is not None for p in cached.attn_processors.values())
    clear_text_kv(cached)
    assert all(p._entry is None for p in cached.attn_processors.values())


def test_cfg_sampling_projects_the_text_once_per_call(pair):
    plain, cached = pair
    calls = count_key_projections(cached)
    layers = sum(name.endswith("attn2.to_k") for name, _ in cached.named_modules())
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False)
    cond, uncond, z_T = torch.randn(2, 5, 12), torch.zeros(2, 5, 12), torch.randn(2, 4, 8, 8)
    results = []
    for unet in (plain, cached):
        results.append(sample(denoiser=lambda z, t, c, u=unet: u(z, t, encoder_hidden_states=c).sample,
                              scheduler=sched, decode=lambda z: z, cond=cond, uncond=uncond, latents=z_T,
                              cfg_scale=3.0, num_steps=4))
    assert torch.equal(results[0].latents, results[1].latents)
    assert calls[0] == layers  # 4 steps, one projection


def test_the_embedded_generator_gets_it():
    from longtail.models.ldm import LatentDiffusion

    ldm = LatentDiffusion(unet=tiny_unet(), vae=None, tokenizer=None, text_encoder=None, scheduler=None)
    assert all(isinstance(p, TextKVProcessor) for p in ldm.unet.attn_processors.values())
    assert type(AttnProcessor2_0()) is not TextKVProcessor
