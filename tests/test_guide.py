"""``LongtailGuide`` on its own (Eq. 11 against analytic gradients), and the sampler's use of it."""

import math

import pytest
import torch

from longtail.evaluation.trajectory import trajectory_analysis
from longtail.guidance import GuidanceConfig, LongtailGuide, StepRecord, predicted_z0
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
