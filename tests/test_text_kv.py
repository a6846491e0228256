"""Cross-attention keys / values once per sampling call (longtail.models.text_kv): the same outputs, fewer
projections inside a sampling scope, and diffusers' processor call for call whenever reuse could be wrong."""

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor

from longtail.models.ldm import LatentDiffusion
from longtail.models.text_kv import TextKVProcessor, install_text_kv, text_kv_scope
from longtail.sampling import sample

LAYERS = 7  # cross-attention layers of tiny_unet: down 1 + 1, mid 1, up 2 + 2 (an up block has layers_per_block + 1)


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=2, norm_num_groups=4,
    ).eval()


def key_projections(unet: UNet2DConditionModel) -> list[int]:
    """A counter of cross-attention to_k calls (hooks on every attn2.to_k)."""
    calls = [0]
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_k"):
            module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    assert sum(name.endswith("attn2.to_k") for name, _ in unet.named_modules()) == LAYERS
    return calls


def kept(unet: UNet2DConditionModel) -> int:
    """Layers holding a projection."""
    return sum(p._entry is not None and p._entry[2] is not None for p in unet.attn_processors.values())


@pytest.fixture
def pair():
    """A plain UNet and a copy with TextKVProcessor, same weights."""
    plain, cached = tiny_unet(), tiny_unet()
    assert install_text_kv(cached)
    assert all(isinstance(p, TextKVProcessor) for p in cached.attn_processors.values())
    return plain, cached


def call(unet, z, text, t=500):
    return unet(z, torch.full((z.shape[0],), t), encoder_hidden_states=text).sample


def inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 5, 12, generator=g)


def test_outside_a_scope_it_is_diffusers_processor(pair):
    plain, cached = pair
    calls = key_projections(cached)
    z, text = inputs()
    with torch.no_grad():
        for t in (900, 500, 100):
            assert torch.equal(call(cached, z, text, t), call(plain, z, text, t))
    assert calls[0] == 3 * LAYERS and kept(cached) == 0


def test_in_a_scope_the_same_outputs_from_two_projections_per_text(pair):
    plain, cached = pair
    calls = key_projections(cached)
    z, text = inputs()
    with torch.no_grad(), text_kv_scope(cached):
        for t in (900, 500, 100, 50):
            assert torch.equal(call(cached, z, text, t), call(plain, z, text, t))
        assert calls[0] == 2 * LAYERS and kept(cached) == LAYERS  # projected at the first two sightings only
        other = text.clone()  # equal values, another tensor: seen afresh
        assert torch.equal(call(cached, z, other), call(plain, z, other))
        assert calls[0] == 3 * LAYERS
    assert all(p._entry is None and p.active == 0 for p in cached.attn_processors.values())  # forgotten on exit


def test_a_new_tensor_every_call_keeps_nothing(pair):
    """SDXL-like callers slice their conditioning afresh per call: no memory held, nothing to pay."""
    _, cached = pair
    calls = key_projections(cached)
    z, text = inputs()
    with torch.no_grad(), text_kv_scope(cached):
        for _ in range(3):
            call(cached, z, text[:, :4])
            assert kept(cached) == 0
    assert calls[0] == 3 * LAYERS


def test_text_changed_in_place_is_projected_again(pair):
    plain, cached = pair
    z, text = inputs()
    with torch.no_grad(), text_kv_scope(cached):
        call(cached, z, text), call(cached, z, text)
        text.mul_(-2.0)
        assert torch.equal(call(cached, z, text), call(plain, z, text))


def test_weights_changed_in_place_in_a_scope_are_projected_again(pair):
    plain, cached = pair
    z, text = inputs()
    with torch.no_grad(), text_kv_scope(cached):
        call(cached, z, text), call(cached, z, text)
        for unet in (plain, cached):
            for name, module in unet.named_modules():
                if name.endswith("attn2.to_k"):
                    module.weight.add_(0.5)
        assert torch.equal(call(cached, z, text), call(plain, z, text))


def test_weights_written_through_data_between_calls_are_used(pair):
    """EMA copies write ``p.data`` (no version bump): a scope ends with its call, so the next one sees them."""
    plain, cached = pair
    z, text = inputs()
    with torch.no_grad():
        with text_kv_scope(cached):
            call(cached, z, text), call(cached, z, text)
        new = {k: v + 0.25 for k, v in plain.state_dict().items()}
        for unet in (plain, cached):
            for name, p in unet.named_parameters():
                p.data.copy_(new[name])
        with text_kv_scope(cached):
            assert torch.equal(call(cached, z, text), call(plain, z, text))


def test_training_in_a_scope_keeps_the_weights_gradients(pair):
    """Reuse only where no gradient flows through the projection: no_grad calls then a training call with the
    same text still give the weights their gradients."""
    plain, cached = pair
    z, text = inputs()
    grads = []
    for unet in (plain, cached):
        unet.zero_grad()
        with text_kv_scope(unet):
            with torch.no_grad():
                call(unet, z, text), call(unet, z, text)  # kept, for the cached one
            for _ in range(2):
                call(unet, z, text).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None]))
    assert grads[0].numel() == grads[1].numel() and torch.equal(grads[0], grads[1])


def test_gradient_to_the_latents_through_kept_keys(pair):
    """Guidance through the denoiser: the latent needs a gradient, the projections do not."""
    plain, cached = pair
    for unet in (plain, cached):
        unet.requires_grad_(False)
    _, text = inputs()
    grads = []
    for unet in (plain, cached):
        z = inputs(seed=1)[0].requires_grad_(True)
        with text_kv_scope(unet):
            for _ in range(3):
                call(unet, z, text).square().sum().backward()
        grads.append(z.grad)
    assert kept(cached) == 0 and torch.equal(grads[0], grads[1])


def test_autocast_is_never_served_a_kept_projection(pair):
    plain, cached = pair
    z, text = inputs()
    with torch.no_grad(), text_kv_scope(cached):
        call(cached, z, text), call(cached, z, text)  # kept in fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(call(cached, z, text), call(plain, z, text))
        assert torch.equal(call(cached, z, text), call(plain, z, text))


def test_a_custom_processor_is_left_alone():
    unet = tiny_unet()
    unet.set_attn_processor(AttnProcessor())
    assert not install_text_kv(unet)
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())


def test_a_lora_layer_is_not_reused():
    pytest.importorskip("peft")
    from peft import LoraConfig

    plain, cached = tiny_unet(), tiny_unet()
    install_text_kv(cached)
    for unet in (plain, cached):
        torch.manual_seed(1)  # the same random (non-zero) LoRA weights on both
        unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_k", "to_v"]))
    z, text = inputs()
    with torch.no_grad(), text_kv_scope(cached):
        for _ in range(3):
            assert torch.equal(call(cached, z, text), call(plain, z, text))
        assert kept(cached) == 0


def ldm_of(unet: UNet2DConditionModel) -> LatentDiffusion:
    return LatentDiffusion(unet=unet, vae=None, tokenizer=None, text_encoder=None, scheduler=None)


def test_a_latent_diffusion_unet_gets_the_processors():
    ldm = ldm_of(tiny_unet())
    assert all(isinstance(p, TextKVProcessor) for p in ldm.unet.attn_processors.values())


def test_cfg_sampling_projects_the_text_twice_per_call():
    plain, ldm = tiny_unet(), ldm_of(tiny_unet())
    calls = key_projections(ldm.unet)
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False)
    cond, uncond, z_T = torch.randn(2, 5, 12), torch.zeros(2, 5, 12), torch.randn(2, 4, 8, 8)
    kw = dict(scheduler=sched, decode=lambda z: z, cond=cond, uncond=uncond, latents=z_T, cfg_scale=3.0, num_steps=6)
    reference = sample(denoiser=lambda z, t, c: plain(z, t, encoder_hidden_states=c).sample, **kw)
    result = sample(denoiser=ldm.denoise, **kw)  # a bound method of LatentDiffusion: its sampling_scope applies
    assert torch.equal(reference.latents, result.latents)
    assert calls[0] == 2 * LAYERS  # 6 steps, two projections
    assert kept(ldm.unet) == 0  # nothing held after the call
