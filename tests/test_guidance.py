import math

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)

from helpers import toy_parts
from longtail.generate import generate, plan_jobs
from longtail.guidance import (
    GuidanceWindow,
    LongtailGuide,
    eps_from_model_output,
    guided_eps,
    longtail_grad,
    make_score_fn,
    model_output_from_eps,
    predicted_z0,
)
from longtail.sampling import (
    RECURRENT_SCHEDULERS,
    SUPPORTED_SCHEDULERS,
    GuidanceConfig,
    check_scheduler,
    initial_latents,
    renoise,
    sample,
)


def ddim():
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, clip_sample=False, set_alpha_to_one=False)


def test_eq8_and_eq11_on_numbers():
    z, eps = torch.tensor([2.0]), torch.tensor([1.0])
    a = 0.64  # sqrt(a) = 0.8, sqrt(1 - a) = 0.6
    assert predicted_z0(z, eps, a).item() == pytest.approx((2.0 - 0.6) / 0.8)
    assert guided_eps(eps, torch.tensor([0.5]), a, weight=2.0).item() == pytest.approx(1.0 - 2.0 * 0.6 * 0.5)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_model_output_conversions_round_trip(kind):
    torch.manual_seed(0)
    z, out = torch.randn(3, 4), torch.randn(3, 4)
    eps = eps_from_model_output(out, z, 0.3, kind)
    assert torch.allclose(model_output_from_eps(eps, z, 0.3, kind), out, atol=1e-5)


@pytest.mark.parametrize("through_denoiser", [False, True])
def test_latent_gradient_matches_finite_differences(through_denoiser):
    decoder, classifier, denoise = toy_parts()
    score_fn = make_score_fn(decoder, classifier, "entropy")
    a = 0.5
    z = torch.randn(2, 6, dtype=torch.float64)
    eps_const = denoise(z).detach()

    def f(zz):
        e = denoise(zz) if through_denoiser else eps_const
        return score_fn(predicted_z0(zz, e, a))[0]

    lg = (longtail_grad(z, a, score_fn, eps_fn=denoise) if through_denoiser
          else longtail_grad(z, a, score_fn, eps=eps_const))
    h = 1e-6
    numeric = torch.zeros_like(z)
    for b in range(2):
        for j in range(6):
            dz = torch.zeros_like(z)
            dz[b, j] = h
            numeric[b, j] = (f(z + dz)[b] - f(z - dz)[b]) / (2 * h)
    assert torch.allclose(lg.grad, numeric, atol=1e-6, rtol=1e-5)
    assert lg.finite.all()


class GaussianDenoiser(torch.nn.Module):
    """The exact eps-predictor for data z0 ~ N(mu, s^2 I): eps = sqrt(1-a) (z - sqrt(a) mu) / (a s^2 + 1 - a)."""

    def __init__(self, scheduler, mu=2.0, s=0.5):
        super().__init__()
        self.alphas, self.mu, self.s = scheduler.alphas_cumprod, mu, s

    def forward(self, z, t, cond):
        a = self.alphas[int(t)]
        return (1 - a).sqrt() * (z - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)


def boundary_classifier(x):
    """Two classes split at mean(x) = 0: data at mu = 2 are confident; entropy peaks at the boundary."""
    m = x.flatten(1).mean(dim=1, keepdim=True)
    return torch.cat([0.5 * m, -0.5 * m], dim=1)


def test_guidance_raises_the_signal_on_a_known_toy_problem():
    sched = ddim()
    den = GaussianDenoiser(sched)
    z_T = initial_latents(range(16), (4,))
    cond = torch.zeros(16, 1)
    labels = torch.zeros(16, dtype=torch.long)
    kw = dict(num_steps=20, classifier=boundary_classifier, labels=labels)
    kw.update(denoiser=den, scheduler=sched, decode=lambda z: z, cond=cond, latents=z_T)
    plain = sample(**kw)
    guided = sample(guidance=GuidanceConfig("entropy", weight=3.0), **kw)
    # Unguided samples sit near mu = 2 (confident); guidance toward higher entropy pulls them to the boundary.
    assert plain.latents.mean().item() == pytest.approx(2.0, abs=0.35)
    assert guided.latents.mean() < plain.latents.mean() - 0.3
    assert guided.signal.mean() > plain.signal.mean() + 0.05
    assert guided.p_class.mean() < plain.p_class.mean()
    assert guided.p_class.mean() > 0.5  # still the intended class on average: in distribution
    assert len(guided.trajectory) == 20 and guided.nonfinite == 0


def tiny_sd_parts():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=2, norm_num_groups=4,
    ).eval()
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=16).eval()
    return unet, vae


def test_weight_zero_gives_exactly_the_unguided_sample(tiny_cnn):
    unet, vae = tiny_sd_parts()
    sched = ddim()

    def denoiser(z, t, cond):
        return unet(z, t, encoder_hidden_states=cond).sample

    def decode(z):
        return vae.decode(z).sample

    cond, uncond = torch.randn(3, 5, 12), torch.zeros(3, 5, 12)
    z_T = initial_latents([1, 2, 3], (4, 8, 8))
    kw = dict(denoiser=denoiser, scheduler=sched, decode=decode, cond=cond, latents=z_T, uncond=uncond,
              cfg_scale=3.0, num_steps=2, classifier=tiny_cnn.eval(), labels=torch.tensor([0, 1, 2]))
    plain = sample(**kw)
    zero = sample(guidance=GuidanceConfig("entropy", weight=0.0), **kw)
    strong = sample(guidance=GuidanceConfig("entropy", weight=50.0), **kw)
    assert torch.equal(plain.latents, zero.latents)
    assert torch.equal(plain.images, zero.images)
    assert len(zero.trajectory) == 2  # the signal was computed, just not applied
    assert not torch.equal(plain.latents, strong.latents)
    assert plain.images.shape == (3, 1, 16, 16)


class NaNForFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[0] = float("nan")
        return g


def test_non_finite_gradients_fall_back_to_unguided_per_sample():
    sched = ddim()
    den = GaussianDenoiser(sched)
    z_T = initial_latents([5, 6], (4,))
    cond = torch.zeros(2, 1)
    kw = dict(denoiser=den, scheduler=sched, cond=cond, latents=z_T, num_steps=5, classifier=boundary_classifier)
    plain = sample(decode=lambda z: z, **kw)
    guided = sample(decode=NaNForFirst.apply, guidance=GuidanceConfig("entropy", weight=3.0), **kw)
    assert guided.nonfinite == 5  # sample 0 at each of the 5 steps
    assert torch.equal(guided.latents[0], plain.latents[0])
    assert not torch.allclose(guided.latents[1], plain.latents[1])
    assert torch.isfinite(guided.latents).all()


def test_initial_latents_do_not_depend_on_the_batch():
    a = initial_latents([3, 4, 5], (2, 2))
    b = initial_latents([5], (2, 2))
    assert torch.equal(a[2], b[0])


def test_guidance_window():
    w = GuidanceWindow(0.0, 0.5, every=2)
    assert [i for i in range(10) if w.active(i, 10)] == [0, 2, 4]
    w = GuidanceWindow(0.25, 1.0)
    assert [i for i in range(8) if w.active(i, 8)] == [2, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="window"):
        GuidanceWindow(0.6, 0.5)


def test_scheduler_checks():
    with pytest.raises(ValueError, match="clip_sample"):
        check_scheduler(DDIMScheduler())  # diffusers' default clip_sample=True: the latent-collapse trap
    with pytest.raises(ValueError, match="not supported"):
        check_scheduler(HeunDiscreteScheduler())
    check_scheduler(ddim())


@pytest.mark.parametrize("make", [
    lambda: EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012),
    lambda: DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                        beta_start=0.00085, beta_end=0.012),
])
def test_other_schedulers_sample_the_data_and_guidance_moves_them(make):
    """Euler (sigma space) and DPM-Solver++ reach the toy data mean, and guidance acts as with DDIM."""
    sched = make()
    den = GaussianDenoiser(ddim())  # the exact eps for the same betas
    z_T = initial_latents(range(16), (4,))
    kw = dict(denoiser=den, scheduler=sched, decode=lambda z: z, cond=torch.zeros(16, 1), latents=z_T,
              num_steps=20, classifier=boundary_classifier, labels=torch.zeros(16, dtype=torch.long))
    plain = sample(**kw)
    guided = sample(guidance=GuidanceConfig("entropy", weight=3.0), **kw)
    assert plain.latents.mean().item() == pytest.approx(2.0, abs=0.35)
    assert guided.signal.mean() > plain.signal.mean() + 0.05


def test_through_denoiser_mode_runs_in_the_sampler():
    sched = ddim()
    den = GaussianDenoiser(sched)
    z_T = initial_latents(range(4), (4,))
    res = sample(denoiser=den, scheduler=sched, decode=lambda z: z, cond=torch.zeros(4, 1), latents=z_T, num_steps=4,
                 classifier=boundary_classifier, guidance=GuidanceConfig("entropy", weight=1.0, through_denoiser=True))
    assert torch.isfinite(res.latents).all() and not math.isnan(res.signal.mean().item())


def test_through_denoiser_reuses_its_eps_and_weight_zero_is_still_unguided(tiny_cnn):
    unet, vae = tiny_sd_parts()
    sched = ddim()
    calls = []

    def denoiser(z, t, cond):
        calls.append(1)
        return unet(z, t, encoder_hidden_states=cond).sample

    def decode(z):
        return vae.decode(z).sample

    cond, z_T = torch.randn(2, 5, 12), initial_latents([1, 2], (4, 8, 8))
    kw = dict(denoiser=denoiser, scheduler=sched, decode=decode, cond=cond, latents=z_T, num_steps=3)
    plain = sample(classifier=tiny_cnn.eval(), **kw)
    n_plain = len(calls)
    zero = sample(classifier=tiny_cnn, guidance=GuidanceConfig("entropy", weight=0.0, through_denoiser=True), **kw)
    assert len(calls) - n_plain == n_plain  # one denoiser pass per step, not two
    assert torch.allclose(plain.latents, zero.latents, atol=1e-6)


# --- on-manifold options in the sampler: every scheduler, w = 0, recurrence, projection -------------------------

_BETAS = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHEDULERS = {
    "DDIMScheduler": ddim,
    "DDPMScheduler": lambda: DDPMScheduler(**_BETAS, clip_sample=False),
    "DPMSolverMultistepScheduler": lambda: DPMSolverMultistepScheduler(**_BETAS),
    "DPMSolverSinglestepScheduler": lambda: DPMSolverSinglestepScheduler(**_BETAS),
    "UniPCMultistepScheduler": lambda: UniPCMultistepScheduler(**_BETAS),
    "PNDMScheduler": lambda: PNDMScheduler(**_BETAS, skip_prk_steps=True),
    "EulerDiscreteScheduler": lambda: EulerDiscreteScheduler(**_BETAS),
    "EulerAncestralDiscreteScheduler": lambda: EulerAncestralDiscreteScheduler(**_BETAS),
}
OPTIONS = {"views": dict(views=3), "project": dict(project=True), "recurrence": dict(recurrence=2),
           "lowpass": dict(lowpass=1.0)}


def test_the_scheduler_table_covers_every_supported_scheduler():
    assert sorted(SCHEDULERS) == sorted(SUPPORTED_SCHEDULERS)
    assert set(RECURRENT_SCHEDULERS) <= set(SUPPORTED_SCHEDULERS)


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_option_is_bit_identical_at_weight_zero_and_guides_on_every_scheduler(option, name, tiny_cnn):
    unet, vae = tiny_sd_parts()
    calls = []

    def denoiser(z, t, cond):
        calls.append(1)
        return unet(z, t, encoder_hidden_states=cond).sample

    def run(weight=None):
        guidance = None if weight is None else GuidanceConfig("entropy", weight, **OPTIONS[option])
        return sample(denoiser=denoiser, scheduler=SCHEDULERS[name](), decode=lambda z: vae.decode(z).sample,
                      encode=lambda x: vae.encode(x).latent_dist.mean, cond=torch.randn(2, 5, 12,
                      generator=torch.Generator().manual_seed(0)), latents=initial_latents([1, 2], (4, 8, 8)),
                      num_steps=3, classifier=tiny_cnn.eval(), guidance=guidance,
                      generator=torch.Generator().manual_seed(0))

    if option == "recurrence" and name not in RECURRENT_SCHEDULERS:
        with pytest.raises(ValueError, match="recurrence"):
            run(1.0)
        assert calls == []  # refused before any denoiser call
        return
    plain = run()
    steps = len(calls)  # one call per scheduler timestep (PNDM has one more than num_steps)
    zero = run(0.0)
    assert torch.equal(plain.latents, zero.latents) and torch.equal(plain.images, zero.images)
    assert zero.denoiser_calls == plain.denoiser_calls == steps and zero.recurrence_calls == 0
    strong = run(50.0)
    assert torch.isfinite(strong.latents).all() and not torch.equal(plain.latents, strong.latents)
    assert strong.recurrence_calls == (2 * steps if option == "recurrence" else 0)
    assert strong.denoiser_calls == steps + strong.recurrence_calls == len(calls) - 2 * steps


def _toy_kwargs(n: int = 16, scheduler=None, steps: int = 20) -> dict:
    sched = scheduler or ddim()
    return dict(denoiser=GaussianDenoiser(ddim()), scheduler=sched, decode=lambda z: z, cond=torch.zeros(n, 1),
                latents=initial_latents(range(n), (4,)), num_steps=steps, classifier=boundary_classifier,
                labels=torch.zeros(n, dtype=torch.long))


def test_recurrence_zero_is_the_plain_guided_loop_written_out():
    """r = 0 reproduces Algorithm 1 written by hand: eps, Eq. 11, DDIM step."""
    kw = _toy_kwargs(n=4, steps=6)
    res = sample(guidance=GuidanceConfig("entropy", 3.0, recurrence=0), **kw)
    sched = ddim()
    sched.set_timesteps(6)
    guide = LongtailGuide(GuidanceConfig("entropy", 3.0), boundary_classifier, lambda z: z, num_steps=6)
    z = kw["latents"]
    for i, t in enumerate(sched.timesteps):
        a = sched.alphas_cumprod[int(t)]
        z = sched.step(guide(i, z, a, kw["denoiser"](z, t, None)), t, z).prev_sample
    assert torch.equal(res.latents, z)
    assert res.denoiser_calls == 6 and res.recurrence_calls == 0


def test_recurrence_redoes_guided_steps_only():
    calls = []
    kw = _toy_kwargs(n=4, steps=6)
    den = kw["denoiser"]
    kw["denoiser"] = lambda z, t, c: calls.append(int(t)) or den(z, t, c)
    res = sample(guidance=GuidanceConfig("entropy", 3.0, start=0.5, recurrence=2), **kw)
    assert len(calls) == 3 + 3 * 3 == res.denoiser_calls and res.recurrence_calls == 6
    assert calls[3:6] == [calls[3]] * 3  # the guided steps are called (1 + r) times at the same timestep
    assert [(r.step, r.repeat) for r in res.trajectory] == [(s, k) for s in (3, 4, 5) for k in range(3)]
    again = sample(guidance=GuidanceConfig("entropy", 3.0, start=0.5, recurrence=2), **_toy_kwargs(n=4, steps=6))
    assert torch.equal(res.latents, again.latents)  # seeded re-noising: runs repeat
    other = sample(guidance=GuidanceConfig("entropy", 3.0, start=0.5, recurrence=2, seed=1), **_toy_kwargs(4, steps=6))
    assert not torch.equal(res.latents, other.latents)


@pytest.mark.parametrize("name", sorted(RECURRENT_SCHEDULERS))
def test_recurrence_moves_the_signal_at_least_as_far_on_the_gaussian_toy(name):
    """One guided step (window [0.25, 0.3) of 20), redone r times: each pass adds its push, so the signal grows
    with r. (Over a long window at a fixed weight the re-noising also contracts the drift that earlier guided
    steps left, by sqrt(a_t / a_{t-1}) per pass, so there recurrence can end below r = 0 on this exact toy.)"""
    def run(r=None):
        guidance = None if r is None else GuidanceConfig("entropy", 10.0, start=0.25, end=0.3, recurrence=r)
        return sample(guidance=guidance, generator=torch.Generator().manual_seed(0),
                      **_toy_kwargs(n=32, scheduler=SCHEDULERS[name]()))

    plain, once, thrice = run(), run(0), run(2)
    assert len(once.trajectory) == 1 and len(thrice.trajectory) == 3 and thrice.recurrence_calls == 2
    assert once.signal.mean() > plain.signal.mean() + 0.005
    assert thrice.signal.mean() >= once.signal.mean() + 0.005
    assert thrice.p_class.mean() > 0.5  # still the intended class on average


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                                  "EulerAncestralDiscreteScheduler"])
def test_recurrence_with_negligible_guidance_still_samples_the_data(name):
    """Re-noising keeps each level's marginal (and Euler's step index is rewound): the data mean is reached."""
    res = sample(guidance=GuidanceConfig("entropy", 1e-6, recurrence=2), generator=torch.Generator().manual_seed(0),
                 **_toy_kwargs(n=64, scheduler=SCHEDULERS[name]()))
    assert res.latents.mean().item() == pytest.approx(2.0, abs=0.25)
    assert res.latents.std().item() == pytest.approx(0.5, abs=0.2)


def test_renoise_has_the_forward_marginal_and_sigma_space_agrees():
    a_t, a_prev = torch.tensor(0.3), torch.tensor(0.6)
    mu, s = 2.0, 0.5
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    z_prev = a_prev.sqrt() * (mu + s * torch.randn(n, generator=gen)) + (1 - a_prev).sqrt() * torch.randn(n, generator=gen)
    z_t = renoise(z_prev, a_t, a_prev, torch.randn(n, generator=gen))
    assert z_t.mean().item() == pytest.approx(a_t.sqrt().item() * mu, abs=0.01)
    assert z_t.var().item() == pytest.approx((a_t * s**2 + 1 - a_t).item(), abs=0.01)
    x_prev, noise = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    a_t, a_prev = a_t.double(), a_prev.double()
    sigma_t2, sigma_prev2 = 1 / a_t - 1, 1 / a_prev - 1
    expected = x_prev + (sigma_t2 - sigma_prev2).sqrt() * noise  # Euler: x_t = x_{t-1} + sqrt(dsigma^2) noise
    assert torch.allclose(renoise(x_prev, a_t, a_prev, noise, sigma_space=True), expected, atol=1e-12)


def test_projection_in_the_sampler_with_an_identity_autoencoder_changes_nothing():
    plain = sample(guidance=GuidanceConfig("entropy", 3.0), **_toy_kwargs())
    projected = sample(guidance=GuidanceConfig("entropy", 3.0, project=True), encode=lambda x: x, **_toy_kwargs())
    assert torch.allclose(projected.latents, plain.latents, atol=1e-4)
    shrunk = sample(guidance=GuidanceConfig("entropy", 3.0, project=True), encode=lambda x: 0.5 * x,
                    **_toy_kwargs())
    assert shrunk.latents.mean() < plain.latents.mean() - 0.5  # the projection is applied


def test_sampler_option_errors_name_the_setting():
    kw = _toy_kwargs(n=2, steps=2)
    for option, match in ((dict(views=0), "views"), (dict(recurrence=-1), "recurrence"),
                          (dict(lowpass=-1.0), "lowpass"), (dict(project=True), "encode")):
        with pytest.raises(ValueError, match=match):
            sample(guidance=GuidanceConfig("entropy", 1.0, **option), **kw)
    with pytest.raises(ValueError, match="unknown guidance option"):
        GuidanceConfig("entropy", 1.0).with_options(recurrance=2)


class _StubLDM:
    """What ``generate`` needs of a ``LatentDiffusion``, on the Gaussian toy; counts encoder calls."""

    latent_shape, device, dtype = (4,), torch.device("cpu"), torch.float32

    def __init__(self):
        self.scheduler, self.encoded = ddim(), 0
        self.denoise = GaussianDenoiser(self.scheduler)

    def encode_prompts(self, prompts):
        return torch.zeros(len(prompts), 1)

    def decode(self, z):
        return z

    def encode(self, x):
        self.encoded += 1
        return x


def test_generate_passes_the_models_encoder_when_guidance_projects():
    jobs = plan_jobs([2, 2], lambda c, i: "p")
    ldm = _StubLDM()
    generate(ldm, jobs, classifier=boundary_classifier, guidance=GuidanceConfig("entropy", 1.0), num_steps=3,
             cfg_scale=1.0, show=False)
    assert ldm.encoded == 0
    out = generate(ldm, jobs, classifier=boundary_classifier, guidance=GuidanceConfig("entropy", 1.0, project=True),
                   num_steps=3, cfg_scale=1.0, show=False)
    assert ldm.encoded == 3 and len(out) == 4  # once per guided step, one batch
