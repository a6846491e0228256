"""``LongtailGuide`` on its own (Eq. 11 against analytic gradients), and the sampler's use of it."""

import math

import pytest
import torch

from longtail.evaluation.trajectory import trajectory_analysis
from longtail.guidance import (
    GuidanceConfig,
    LongtailGuide,
    StepRecord,
    apply_views,
    lowpass_grad,
    option_generator,
    predicted_z0,
    view_transforms,
)
from longtail.sampling import initial_latents, sample
from test_guidance import GaussianDenoiser, NaNForFirst, boundary_classifier, ddim

A_T = torch.tensor(0.36, dtype=torch.float64)  # sqrt(a) = 0.6, sqrt(1 - a) = 0.8


def _linear_classifier(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(6, 3, bias=False).to(torch.float64).requires_grad_(False)


def _energy_grad(clf: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """d energy / d x for logits l = x W^T, energy = -logsumexp(l): -softmax(l) W, by hand."""
    return -(x @ clf.weight.T).softmax(dim=-1) @ clf.weight


def _guide(weight: float = 2.0, decode=lambda z: z, num_steps: int = 4, **config) -> LongtailGuide:
    return LongtailGuide(GuidanceConfig("energy", weight, **config), _linear_classifier(), decode,
                         num_steps=num_steps)


def _z_eps(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6, generator=gen, dtype=torch.float64), torch.randn(2, 6, generator=gen, dtype=torch.float64)


def test_eq11_with_the_analytic_energy_gradient():
    guide = _guide(weight=2.0)
    z, eps = _z_eps()
    guided = guide(0, z, A_T, eps, timestep=981)
    grad = _energy_grad(_linear_classifier(), predicted_z0(z, eps, A_T)) / 0.6  # d z0 / d z_t = 1 / sqrt(a)
    assert torch.allclose(guided, eps - 0.8 * 2.0 * grad, atol=1e-12)
    assert guide.records == [StepRecord(0, 981, pytest.approx(float(-torch.logsumexp(
        predicted_z0(z, eps, A_T) @ _linear_classifier().weight.T, dim=-1).mean())), pytest.approx(
        float(grad.pow(2).mean().sqrt())))]
    assert guide.nonfinite == 0


def test_on_noisy_scores_the_noisy_latent_itself():
    guide = _guide(weight=2.0, on_noisy=True)
    z, eps = _z_eps()
    guided = guide(0, z, A_T, eps)
    assert torch.allclose(guided, eps - 0.8 * 2.0 * _energy_grad(_linear_classifier(), z), atol=1e-12)
    assert guide.records[0].timestep == -1  # no timestep given


def test_through_denoiser_differentiates_the_denoiser_too():
    torch.manual_seed(3)
    denoise = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()).to(torch.float64).requires_grad_(False)
    guide = _guide(weight=2.0, through_denoiser=True)
    z, _ = _z_eps()
    assert guide.needs_denoiser_graph(0)
    with pytest.raises(ValueError, match="autograd"):
        guide(0, z, A_T, denoise(z))  # eps without a graph back to z
    leaf = z.clone().requires_grad_(True)
    with torch.enable_grad():
        eps = denoise(leaf)
    guided = guide(0, leaf, A_T, eps)
    x = z.clone().requires_grad_(True)
    score = -torch.logsumexp(predicted_z0(x, denoise(x), A_T) @ _linear_classifier().weight.T, dim=-1)
    (exact,) = torch.autograd.grad(score.sum(), x)
    assert torch.allclose(guided, eps.detach() - 0.8 * 2.0 * exact, atol=1e-12)
    assert not guided.requires_grad
    detached = _guide(weight=2.0)(0, z, A_T, denoise(z))
    assert not torch.allclose(guided, detached)  # the denoiser's Jacobian matters here


def test_weight_zero_returns_eps_bit_identical_but_records_the_signal():
    guide = _guide(weight=0.0)
    z, eps = _z_eps()
    assert torch.equal(guide(0, z, A_T, eps), eps)
    assert len(guide.records) == 1 and guide.records[0].grad_rms > 0


def test_closed_window_returns_eps_unchanged_and_records_nothing():
    guide = _guide(weight=5.0, start=0.5, end=1.0, num_steps=4)
    z, eps = _z_eps()
    assert [i for i in range(4) if guide.active(i)] == [2, 3]
    assert torch.equal(guide(1, z, A_T, eps), eps)
    assert guide.records == [] and guide.nonfinite == 0
    assert not torch.equal(guide(2, z, A_T, eps), eps)
    assert [r.step for r in guide.records] == [2]


def test_normalisation_gives_the_gradient_the_rms_of_eps():
    z, eps = _z_eps()
    eps = eps * torch.tensor([[1.0], [7.0]], dtype=torch.float64)  # per-sample scales differ
    guide = _guide(weight=0.5, normalize=True)
    grad = (eps - guide(0, z, A_T, eps)) / (0.5 * 0.8)
    rms = grad.pow(2).mean(dim=1).sqrt()
    assert torch.allclose(rms, eps.pow(2).mean(dim=1).sqrt(), rtol=1e-6)  # eps RMS is taken in float32
    raw = _energy_grad(_linear_classifier(), predicted_z0(z, eps, A_T))
    assert torch.allclose(torch.cosine_similarity(grad, raw, dim=1), torch.ones(2, dtype=torch.float64))
    assert not torch.allclose(rms, raw.pow(2).mean(dim=1).sqrt() / 0.6)


def test_non_finite_gradient_falls_back_to_eps_for_that_sample_only():
    guide = _guide(weight=2.0, decode=NaNForFirst.apply)
    z, eps = _z_eps()
    guided = guide(0, z, A_T, eps)
    assert torch.equal(guided[0], eps[0]) and not torch.allclose(guided[1], eps[1])
    assert guide.nonfinite == 1
    guide(1, z, A_T, eps)
    assert guide.nonfinite == 2 and torch.isfinite(torch.tensor([r.grad_rms for r in guide.records])).all()


def test_construction_errors():
    with pytest.raises(ValueError, match="window"):
        _guide(start=0.7, end=0.2)
    with pytest.raises(ValueError, match="num_steps"):
        _guide(num_steps=0)
    with pytest.raises(ValueError, match="unknown signal"):
        LongtailGuide(GuidanceConfig("nope", 1.0), _linear_classifier(), lambda z: z, num_steps=2)


def _toy(n: int = 4) -> dict:
    sched = ddim()
    return dict(denoiser=GaussianDenoiser(sched), scheduler=sched, decode=lambda z: z, cond=torch.zeros(n, 1),
                latents=initial_latents(range(n), (4,)), num_steps=6, classifier=boundary_classifier)


def test_sample_is_keyword_only():
    parts = _toy()
    with pytest.raises(TypeError):
        sample(parts["denoiser"], parts["scheduler"], parts["decode"], parts["cond"], parts["latents"])


def test_on_step_gets_a_dict_and_the_scheduler_steps_with_the_guided_eps():
    seen = []
    res = sample(guidance=GuidanceConfig("entropy", 3.0, start=0.5), on_step=seen.append, **_toy())
    assert [s["step"] for s in seen] == list(range(6))
    assert set(seen[0]) == {"step", "timestep", "z", "eps", "a_t", "z0", "guided"}
    for s in seen:
        assert torch.equal(s["z0"], predicted_z0(s["z"], s["eps"], s["a_t"]))
        assert torch.equal(s["guided"], s["eps"]) == (s["step"] < 3)  # guided only inside the window
    assert [r.step for r in res.trajectory] == [3, 4, 5]
    assert [r.timestep for r in res.trajectory] == [int(s["timestep"]) for s in seen[3:]]


def test_trajectory_analysis_reads_the_step_dict():
    torch.manual_seed(0)
    parts = _toy(8)
    rows = trajectory_analysis(parts["denoiser"], parts["scheduler"], parts["decode"], parts["cond"],
                               parts["latents"], features=lambda x: x, real_features=torch.randn(64, 4) * 0.5 + 2.0,
                               classifier=boundary_classifier, guidance=GuidanceConfig("entropy", 3.0),
                               num_steps=6, steps=[0, 5])
    assert [r["step"] for r in rows] == [0, 5]
    assert all(math.isfinite(r["signal_w0"]) and math.isfinite(r["signal_guided"]) for r in rows)
    # the predicted clean latent is closer to the data than the noisy one early on (A.7)
    assert rows[0]["fid_predicted_clean"] < rows[0]["fid_noisy"]
    assert rows[1]["signal_guided"] > rows[1]["signal_w0"]


# --- on-manifold options: views, low-pass, projection, validation ---------------------------------------------


def _image_guide(weight: float = 2.0, decode=None, calls: list | None = None, encode=None, **config) -> LongtailGuide:
    """Energy guidance on 4x4 one-channel "images" (latent [B, 16] or [B, 1, 4, 4]) with a linear classifier."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 3, bias=False).to(torch.float64).requires_grad_(False)

    def classifier(x):
        if calls is not None:
            calls.append(("classifier", x.shape[0]))
        return lin(x.flatten(1))

    def to_image(z):
        if calls is not None:
            calls.append(("decode", z.shape[0]))
        return z.reshape(-1, 1, 4, 4)

    guide = LongtailGuide(GuidanceConfig("energy", weight, **config), classifier, decode or to_image, num_steps=4,
                          encode=encode)
    guide.lin = lin
    return guide


def _image_z_eps(seed: int = 1, shape=(2, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64),
            torch.randn(*shape, generator=gen, dtype=torch.float64))


def _view_matrix(theta: torch.Tensor) -> torch.Tensor:
    """The linear map [16, 16] of one view on 4x4 images, column j = the view of basis image j."""
    basis = torch.eye(16, dtype=torch.float64).reshape(16, 1, 4, 4)
    return apply_views(basis, theta[None]).reshape(16, 16).T


def test_views_one_is_the_plain_gradient_exactly():
    z, eps = _image_z_eps()
    plain = _image_guide()(0, z, A_T, eps)
    one_view = _image_guide(views=1, view_shift=0.3, view_flip=True)(0, z, A_T, eps)  # settings unused at 1
    assert torch.equal(plain, one_view)


def test_identity_shift_and_flip_views_are_exact_resamples():
    img = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    eye = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]], dtype=torch.float64)
    assert torch.allclose(apply_views(img, eye), img, atol=1e-12)
    mirror = torch.tensor([[[-1.0, 0, 0], [0, 1.0, 0]]], dtype=torch.float64)
    assert torch.allclose(apply_views(img, mirror), img.flip(-1), atol=1e-12)
    one_px = torch.tensor([[[1.0, 0, 2 / 6], [0, 1.0, 0]]], dtype=torch.float64)  # 1/6 of the width = 1 pixel
    assert torch.allclose(apply_views(img, one_px)[..., :-1], img[..., 1:], atol=1e-12)
    two = torch.cat([eye, mirror])
    assert torch.allclose(apply_views(img, two), torch.cat([img, img.flip(-1)]), atol=1e-12)  # view-major


def test_view_transforms_respect_their_ranges_and_the_seed():
    t = view_transforms(400, 0.1, 0.2, True, torch.Generator().manual_seed(0))
    assert t.shape == (400, 2, 3)
    scale = t[:, 1, 1]
    assert scale.min() >= 0.8 and scale.max() <= 1.0 and scale.min() < 0.82
    assert t[:, :, 2].abs().max() <= 0.2 and t[:, :, 2].abs().max() > 0.19  # 0.1 of the size = 0.2 normalised
    assert torch.equal(t[:, 0, 0].abs(), scale) and (t[:, 0, 0] < 0).any() and (t[:, 0, 0] > 0).any()
    assert torch.equal(t, view_transforms(400, 0.1, 0.2, True, torch.Generator().manual_seed(0)))
    unflipped = view_transforms(400, 0.1, 0.2, False, torch.Generator().manual_seed(0))
    assert (unflipped[:, 0, 0] > 0).all() and torch.equal(unflipped[:, 1], t[:, 1])


def test_views_average_the_per_view_gradients_computed_by_hand():
    calls: list = []
    guide = _image_guide(weight=2.0, calls=calls, views=4, view_shift=0.2, view_crop=0.2, view_flip=True, seed=7)
    z, eps = _image_z_eps()
    guided = guide(2, z, A_T, eps)
    assert calls == [("decode", 2), ("classifier", 8)]  # decoder once, classifier once on all 4 x 2 views
    thetas = view_transforms(4, 0.2, 0.2, True, option_generator(7, 2, 0))
    x = predicted_z0(z, eps, A_T)
    grads, energies = [], []
    for theta in thetas:
        m = _view_matrix(theta)
        v = x @ m.T  # the view of each sample, flattened
        grads.append(_energy_grad(guide.lin, v) @ m)  # chain rule: M^T dE/dv
        energies.append(-torch.logsumexp(v @ guide.lin.weight.T, dim=-1))
    grad = torch.stack(grads).mean(0) / 0.6
    assert torch.allclose(guided, eps - 0.8 * 2.0 * grad, atol=1e-10)
    assert guide.records[0].mean_signal == pytest.approx(float(torch.stack(energies).mean()))
    assert not torch.allclose(guided, _image_guide(weight=2.0)(2, z, A_T, eps))  # the views matter


def test_views_repeat_per_step_and_pass_and_do_not_depend_on_the_batch():
    z, eps = _image_z_eps()
    guide = _image_guide(views=3)
    first = guide(1, z, A_T, eps)
    assert torch.equal(first, guide(1, z, A_T, eps))  # seeded per step: the run repeats
    assert not torch.equal(first, guide(1, z, A_T, eps, repeat=1))  # a recurrence pass draws new views
    assert not torch.equal(first, guide(2, z, A_T, eps))
    assert torch.allclose(first[1:], guide(1, z[1:], A_T, eps[1:]), atol=1e-12)


def test_lowpass_of_a_delta_gives_the_gaussian_kernel():
    delta = torch.zeros(1, 2, 15, 15, dtype=torch.float64)
    delta[0, 1, 7, 7] = 1.0
    for sigma in (0.8, 1.5):
        r = max(1, math.ceil(3 * sigma))
        x = torch.arange(-r, r + 1, dtype=torch.float64)
        k = torch.exp(-x**2 / (2 * sigma**2))
        k = k / k.sum()
        out = lowpass_grad(delta, sigma)
        expected = torch.zeros_like(delta)
        expected[0, 1, 7 - r:8 + r, 7 - r:8 + r] = torch.outer(k, k)
        assert torch.allclose(out, expected, atol=1e-6)  # the kernel is applied in float32
        assert out.dtype == torch.float64 and out[0, 0].abs().max() == 0  # channels blurred on their own
    assert lowpass_grad(delta, 0.0) is delta
    const = torch.full((2, 4, 3, 5), 0.7)
    assert torch.allclose(lowpass_grad(const, 2.0), const)  # replicate padding keeps a constant gradient
    with pytest.raises(ValueError, match="lowpass"):
        lowpass_grad(delta, -1.0)
    with pytest.raises(ValueError, match="lowpass"):
        lowpass_grad(torch.ones(2, 6), 1.0)  # no spatial dims


def test_guide_lowpass_blurs_the_gradient_before_eq11():
    z, eps = _image_z_eps(shape=(2, 1, 4, 4))
    plain = _image_guide(weight=2.0)(0, z, A_T, eps)
    blurred = _image_guide(weight=2.0, lowpass=1.0)(0, z, A_T, eps)
    assert torch.allclose(eps - blurred, lowpass_grad(eps - plain, 1.0), atol=1e-6)
    assert (eps - blurred).std() < (eps - plain).std()
    guide = _image_guide(weight=2.0, decode=lambda z: z.reshape(-1, 1, 4, 4), lowpass=1.0)
    with pytest.raises(ValueError, match="lowpass"):
        flat_z, flat_eps = _image_z_eps()
        guide(0, flat_z, A_T, flat_eps)  # flat latents [B, 16]


def test_projection_with_identity_autoencoder_equals_no_projection():
    z, eps = _z_eps()
    plain = _guide(weight=2.0)(0, z, A_T, eps)
    identity = LongtailGuide(GuidanceConfig("energy", 2.0, project=True), _linear_classifier(), lambda z: z,
                             num_steps=4, encode=lambda x: x)
    assert torch.allclose(identity(0, z, A_T, eps), plain, atol=1e-12)


def test_projection_with_a_linear_autoencoder_equals_the_closed_form():
    torch.manual_seed(5)
    dec, enc = torch.randn(6, 6, dtype=torch.float64), torch.randn(6, 6, dtype=torch.float64)
    dec[:, 4:] = 0  # decode drops the last two latent coordinates
    z, eps = _z_eps()
    plain = _guide(weight=2.0, decode=lambda v: v @ dec)(0, z, A_T, eps)
    guide = LongtailGuide(GuidanceConfig("energy", 2.0, project=True), _linear_classifier(), lambda v: v @ dec,
                          num_steps=4, encode=lambda x: x @ enc)
    projected = guide(0, z, A_T, eps)
    z0 = (z - 0.8 * plain) / 0.6  # MPGD: z0_p = E(D(z0_g)), eps_p = (z - sqrt(a) z0_p) / sqrt(1 - a)
    assert torch.allclose(projected, (z - 0.6 * (z0 @ dec @ enc)) / 0.8, atol=1e-10)
    eye = torch.eye(6, dtype=torch.float64)
    keep4 = LongtailGuide(GuidanceConfig("energy", 2.0, project=True), _linear_classifier(), lambda v: v @ eye[:, :6],
                          num_steps=4, encode=lambda x: x * torch.tensor([1, 1, 1, 1, 0, 0.0], dtype=torch.float64))
    out = keep4(0, z, A_T, eps)
    assert torch.allclose(out[:, :4], _guide(weight=2.0)(0, z, A_T, eps)[:, :4], atol=1e-12)
    assert torch.allclose(out[:, 4:], z[:, 4:] / 0.8, atol=1e-12)  # z0_p = 0 there: eps = z / sqrt(1 - a)


def test_projection_keeps_eps_where_the_gradient_was_not_finite():
    guide = LongtailGuide(GuidanceConfig("energy", 2.0, project=True), _linear_classifier(), NaNForFirst.apply,
                          num_steps=4, encode=lambda x: 0.5 * x)
    z, eps = _z_eps()
    out = guide(0, z, A_T, eps)
    assert torch.equal(out[0], eps[0]) and not torch.allclose(out[1], eps[1])


@pytest.mark.parametrize("option", [dict(views=3), dict(lowpass=1.0), dict(project=True),
                                    dict(views=2, lowpass=0.5, project=True, normalize=True)])
def test_weight_zero_returns_eps_bit_identical_for_every_option(option):
    z, eps = _image_z_eps(shape=(2, 1, 4, 4))
    guide = _image_guide(weight=0.0, encode=lambda x: 0.5 * x.reshape(-1, 1, 4, 4), **option)
    assert torch.equal(guide(0, z, A_T, eps), eps)
    assert len(guide.records) == 1 and guide.records[0].grad_rms > 0  # the signal was still computed
    assert not torch.equal(_image_guide(weight=2.0, encode=lambda x: 0.5 * x, **option)(0, z, A_T, eps), eps)


@pytest.mark.parametrize("option, match", [
    (dict(views=0), "views"), (dict(recurrence=-1), "recurrence"), (dict(lowpass=-0.5), "lowpass"),
    (dict(lowpass=float("nan")), "lowpass"), (dict(view_shift=0.7), "view_shift"), (dict(view_crop=1.0), "view_crop"),
    (dict(views=3, view_shift=0.0, view_crop=0.0, view_flip=False), "views"),
])
def test_bad_option_values_name_the_setting(option, match):
    with pytest.raises(ValueError, match=match):
        GuidanceConfig("energy", 1.0, **option).check()
    with pytest.raises(ValueError, match=match):
        _guide(**option)
    with pytest.raises(ValueError, match=match):
        GuidanceConfig("energy", 1.0).with_options(**option)


def test_with_options_refuses_unknown_options_and_projection_needs_encode():
    cfg = GuidanceConfig("energy", 1.0)
    with pytest.raises(ValueError, match=r"unknown guidance option.*'view'"):
        cfg.with_options(view=4)
    new = cfg.with_options(views=4, lowpass=1.0)
    assert (new.views, new.lowpass, cfg.views) == (4, 1.0, 1)
    with pytest.raises(ValueError, match=r"project.*encode"):
        _guide(project=True)
