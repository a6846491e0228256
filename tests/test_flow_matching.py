"""Longtail Guidance on a rectified-flow path (velocity models, FlowMatchEulerDiscreteScheduler): Eq. 8 / Eq. 11's
flow analogues, their derivation checked against the eps path, the gradient, and an exact toy problem."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from helpers import toy_parts
from longtail.guidance import (
    LongtailGuide,
    flow_guidance_scale,
    guided_eps,
    guided_velocity,
    longtail_grad,
    make_score_fn,
    noise_from_velocity,
    predicted_x0_flow,
    predicted_z0,
    project_velocity,
)
from longtail.sampling import (
    GuidanceConfig,
    check_scheduler,
    initial_latents,
    is_flow_scheduler,
    renoise_flow,
    sample,
)


def test_eq8_and_eq11_flow_on_numbers():
    x, v = torch.tensor([2.0]), torch.tensor([1.0])
    s = 0.25  # s / (1 - s) = 1/3
    assert predicted_x0_flow(x, v, s).item() == pytest.approx(2.0 - 0.25)
    assert noise_from_velocity(x, v, s).item() == pytest.approx(2.0 + 0.75)
    assert guided_velocity(v, torch.tensor([0.6]), s, weight=2.0).item() == pytest.approx(1.0 - 2.0 * 0.6 / 3)
    assert float(flow_guidance_scale(0.5)) == 1.0
    with pytest.raises(ValueError, match=r"undefined at sigma = 1\.0"):
        guided_velocity(v, v, 1.0, weight=1.0)


@pytest.mark.parametrize("s", [0.05, 0.5, 0.93])
def test_guided_velocity_is_eq11_on_the_equivalent_variance_preserving_path(s):
    """Rewrite x_s = (1 - s) x0 + s n as z = x_s / r (r = sqrt((1-s)^2 + s^2)): a VP latent with sqrt(a) = (1-s)/r,
    eps = the predicted noise, d/dz = r d/dx. Eq. 8 and Eq. 11 there must give the flow functions' x0 and v."""
    torch.manual_seed(0)
    x, v, g = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5,
                                                                                                         dtype=torch.float64)
    r = ((1 - s) ** 2 + s**2) ** 0.5
    a = ((1 - s) / r) ** 2
    z, eps = x / r, noise_from_velocity(x, v, s)
    assert torch.allclose(predicted_z0(z, eps, a), predicted_x0_flow(x, v, s))  # Eq. 8 on both paths
    w = 1.7
    eps_g = guided_eps(eps, r * g, a, w)  # Eq. 11 with the chain rule d/dz = r d/dx
    v_from_vp = eps_g - predicted_z0(z, eps_g, a)  # v = n - x0
    assert torch.allclose(guided_velocity(v, g, s, w), v_from_vp, atol=1e-12)
    # the predicted clean latent moves by w s^2 / (1 - s) g
    shift = predicted_x0_flow(x, guided_velocity(v, g, s, w), s) - predicted_x0_flow(x, v, s)
    assert torch.allclose(shift, w * s**2 / (1 - s) * g, atol=1e-12)


@pytest.mark.parametrize("through_denoiser", [False, True])
def test_flow_latent_gradient_matches_finite_differences(through_denoiser):
    decoder, classifier, velocity = toy_parts()
    score_fn = make_score_fn(decoder, classifier, "entropy")
    s = 0.6
    x = torch.randn(2, 6, dtype=torch.float64)
    v_const = velocity(x).detach()

    def f(xx):
        v = velocity(xx) if through_denoiser else v_const
        return score_fn(predicted_x0_flow(xx, v, s))[0]

    lg = (longtail_grad(x, s, score_fn, eps_fn=velocity, to_z0=predicted_x0_flow) if through_denoiser
          else longtail_grad(x, s, score_fn, eps=v_const, to_z0=predicted_x0_flow))
    h = 1e-6
    numeric = torch.zeros_like(x)
    for b in range(2):
        for j in range(6):
            dx = torch.zeros_like(x)
            dx[b, j] = h
            numeric[b, j] = (f(x + dx)[b] - f(x - dx)[b]) / (2 * h)
    assert torch.allclose(lg.grad, numeric, atol=1e-6, rtol=1e-5)
    if not through_denoiser:  # v held fixed: d x0_hat / d x_s is the identity
        x0 = predicted_x0_flow(x, v_const, s).requires_grad_(True)
        (direct,) = torch.autograd.grad(score_fn(x0)[0].sum(), x0)
        assert torch.allclose(lg.grad, direct, atol=1e-12)


class GaussianVelocity(torch.nn.Module):
    """The exact rectified-flow velocity for data x0 ~ N(mu, c^2 I): with x_s = (1-s) x0 + s n and
    q = (1-s)^2 c^2 + s^2 (the variance of x_s), E[n | x_s] = s (x_s - (1-s) mu) / q and
    E[x0 | x_s] = mu + (1-s) c^2 (x_s - (1-s) mu) / q; v = E[n | x_s] - E[x0 | x_s]."""

    def __init__(self, mu=2.0, c=0.5):
        super().__init__()
        self.mu, self.c = mu, c

    def forward(self, x, t, cond):
        s = (torch.as_tensor(t, dtype=x.dtype) / 1000).reshape(-1, *([1] * (x.dim() - 1)))
        q = (1 - s) ** 2 * self.c**2 + s**2
        dev = x - (1 - s) * self.mu
        return s * dev / q - (self.mu + (1 - s) * self.c**2 * dev / q)


def boundary_classifier(x):
    """Two classes split at mean(x) = 0: data at mu = 2 are confident; entropy peaks at the boundary."""
    m = x.flatten(1).mean(dim=1, keepdim=True)
    return torch.cat([0.5 * m, -0.5 * m], dim=1)


def _toy(n=16, steps=20, shift=1.0, **kw):
    return dict(denoiser=GaussianVelocity(), scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                decode=lambda z: z, cond=torch.zeros(n, 1), latents=initial_latents(range(n), (4,)), num_steps=steps,
                classifier=boundary_classifier, labels=torch.zeros(n, dtype=torch.long), **kw)


def test_exact_velocity_transports_noise_to_the_data():
    """The flow map of N(0, 1) -> N(mu, c^2) is x0 = mu + c n: many Euler steps on the exact field land there."""
    res = sample(**_toy(n=8, steps=200))
    assert torch.allclose(res.latents, 2.0 + 0.5 * initial_latents(range(8), (4,)), atol=2e-2)


def test_flow_guidance_raises_the_signal_and_weight_zero_is_bit_identical():
    plain = sample(**_toy())
    zero = sample(guidance=GuidanceConfig("entropy", weight=0.0), **_toy())
    assert torch.equal(zero.latents, plain.latents) and torch.equal(zero.images, plain.images)
    assert len(zero.trajectory) == 19  # the first step sits at sigma = 1 (pure noise): unguided, unrecorded
    assert plain.latents.mean().item() == pytest.approx(2.0, abs=0.35)
    # Guidance toward higher entropy pulls samples from mu = 2 (confident) to the boundary, more with more weight.
    runs = [plain] + [sample(guidance=GuidanceConfig("entropy", weight=w), **_toy()) for w in (3.0, 10.0)]
    means = [r.latents.mean().item() for r in runs]
    signals = [r.signal.mean().item() for r in runs]
    p_class = [r.p_class.mean().item() for r in runs]
    assert means[0] > means[1] + 0.2 > means[2] + 0.4
    assert signals[0] + 0.05 < signals[1] < signals[2] - 0.05
    assert p_class[0] > p_class[1] > p_class[2] > 0.5  # still the intended class on average: in distribution
    assert all(r.nonfinite == 0 and torch.isfinite(r.latents).all() for r in runs)


def test_flow_guided_loop_written_out():
    """The sampler's flow branch is: v, guided_velocity (Eq. 11 flow), Euler step, for each sigma."""
    kw = _toy(n=4, steps=5, shift=3.0)
    res = sample(guidance=GuidanceConfig("entropy", 2.0), **kw)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(5)
    score_fn = make_score_fn(lambda z: z, boundary_classifier, "entropy")
    x = kw["latents"]
    for i, t in enumerate(sched.timesteps):
        s, v = sched.sigmas[i], kw["denoiser"](x, t, None)
        if s < 1:
            g = longtail_grad(x, s, score_fn, eps=v, to_z0=predicted_x0_flow).grad
            v = guided_velocity(v, g, s, 2.0)
        x = sched.step(v, t, x).prev_sample
    assert torch.allclose(res.latents, x, atol=1e-6)


def test_flow_options_and_refusals():
    check_scheduler(FlowMatchEulerDiscreteScheduler())
    assert is_flow_scheduler(FlowMatchEulerDiscreteScheduler())
    multistep = _toy(n=2, steps=2)
    multistep["scheduler"] = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    assert is_flow_scheduler(multistep["scheduler"])
    with pytest.raises(ValueError, match="recurrence=1 needs a scheduler whose step is stateless"):
        sample(guidance=GuidanceConfig("entropy", 1.0, recurrence=1), **multistep)
    dynamic = _toy(n=2, steps=2)
    dynamic["scheduler"] = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="mu"):
        sample(**dynamic)
    assert sample(timestep_kwargs={"mu": 0.5}, **dynamic).latents.shape == (2, 4)
    detached = sample(guidance=GuidanceConfig("entropy", 3.0), **_toy(n=2, steps=3))
    exact = sample(guidance=GuidanceConfig("entropy", 3.0, through_denoiser=True), **_toy(n=2, steps=3))
    assert torch.isfinite(exact.latents).all() and not torch.equal(exact.latents, detached.latents)
    steps = []
    sample(on_step=steps.append, guidance=GuidanceConfig("entropy", 1.0, normalize=True, lowpass=0.0),
           **_toy(n=2, steps=3))
    assert [sorted(s) for s in steps[:1]] == [["guided", "sigma", "step", "timestep", "v", "z", "z0"]]
    assert torch.equal(steps[1]["z0"], predicted_x0_flow(steps[1]["z"], steps[1]["v"], steps[1]["sigma"]))


def test_flow_projection_keeps_the_clean_latent_on_the_autoencoder():
    x, v = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    s = 0.4
    halve = (lambda z: 2 * z, lambda img: 0.25 * img)  # decode then encode halves the latent
    v_p = project_velocity(x, v, s, *halve)
    assert torch.allclose(predicted_x0_flow(x, v_p, s), 0.5 * predicted_x0_flow(x, v, s))
    guide = LongtailGuide(GuidanceConfig("entropy", 1.0, project=True), boundary_classifier, halve[0],
                          num_steps=2, encode=halve[1], flow=True)
    out = guide(1, x, torch.tensor(s, dtype=torch.float64), v)
    g = longtail_grad(x, s, make_score_fn(halve[0], boundary_classifier, "entropy"), eps=v,
                      to_z0=predicted_x0_flow).grad
    assert torch.allclose(out, project_velocity(x, guided_velocity(v, g, s, 1.0), s, *halve))
    assert torch.equal(guide(0, x, torch.tensor(1.0, dtype=torch.float64), v), v)  # sigma = 1: unguided


def test_renoise_flow_restores_the_marginal():
    """From x_{s'} = (1 - s') x0 + s' n', renoise_flow gives mean (1 - s) x0 and standard deviation s."""
    gen = torch.Generator().manual_seed(0)
    x0, s, s_prev = torch.full((20000,), 1.5, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64), \
        torch.tensor(0.3, dtype=torch.float64)
    x_prev = (1 - s_prev) * x0 + s_prev * torch.randn(20000, generator=gen, dtype=torch.float64)
    x = renoise_flow(x_prev, s, s_prev, torch.randn(20000, generator=gen, dtype=torch.float64))
    assert x.mean().item() == pytest.approx(0.3 * 1.5, abs=0.02) and x.std().item() == pytest.approx(0.7, abs=0.01)


def test_flow_recurrence_redoes_guided_steps_and_moves_the_signal():
    calls = []
    kw = _toy(n=8, steps=6)
    den = kw["denoiser"]
    kw["denoiser"] = lambda z, t, c: calls.append(float(t)) or den(z, t, c)
    res = sample(guidance=GuidanceConfig("entropy", 3.0, recurrence=2), **kw)
    # step 0 sits at sigma = 1 (unguided, not redone); steps 1..5 run 1 + 2 times
    assert len(calls) == 1 + 5 * 3 == res.denoiser_calls and res.recurrence_calls == 10
    assert calls[1:4] == [calls[1]] * 3
    zero = sample(guidance=GuidanceConfig("entropy", 0.0, recurrence=2), **_toy(n=8, steps=6))
    assert torch.equal(zero.latents, sample(**_toy(n=8, steps=6)).latents) and zero.recurrence_calls == 0


def test_flow_recurrence_moves_the_signal_at_least_as_far_on_the_gaussian_toy():
    """One guided step (window [0.25, 0.3) of 20) redone r times adds its push each pass, as on the eps path
    (over a long window re-noising also contracts earlier drift; tests/test_guidance.py says why)."""
    def run(r=None):
        guidance = None if r is None else GuidanceConfig("entropy", 10.0, start=0.25, end=0.3, recurrence=r)
        return sample(guidance=guidance, **_toy(n=32))

    plain, once, thrice = run(), run(0), run(2)
    assert len(once.trajectory) == 1 and len(thrice.trajectory) == 3 and thrice.recurrence_calls == 2
    assert once.signal.mean() > plain.signal.mean() + 0.005
    assert thrice.signal.mean() >= once.signal.mean() + 0.005
    assert thrice.p_class.mean() > 0.5  # still the intended class on average
