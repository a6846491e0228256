"""The guided DDIM loop (paper Algorithm 1), written out over plain callables.

Parts, all supplied by the caller so the same loop serves the embedded model and Stable Diffusion:

* ``denoiser(z_t [B,...], t [] , cond [B,...]) -> model output`` (eps, v or x0, per the scheduler's config)
* a diffusers scheduler (DDIM first; any variance-preserving one whose ``step`` takes a noise prediction)
* ``decode(z [B,...]) -> image [B, C, H, W]`` (the VAE decoder, scaling included); optionally a cheaper
  ``guide_decode`` used only on the guidance path (a distilled or TAESD-style decoder), final images still
  come from ``decode``
* ``classifier(image) -> logits [B, C] | ClassifierOutput`` (optional; needed for guidance and records)

Per step: classifier-free guidance gives eps; when the guidance window is open, the longtail gradient of
the decoded predicted clean latent biases eps (Eq. 11) before the scheduler step (Eq. 7).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .guidance import (
    GuidanceWindow,
    eps_from_model_output,
    guided_eps,
    longtail_grad,
    make_score_fn,
    model_output_from_eps,
    normalize_grad,
)
from .heads import ClassifierOutput, as_output
from .signals import get_signal

Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]

# Schedulers whose `step` consumes a (modifiable) noise prediction. The loop works in variance-preserving
# space, z_vp = scale_model_input(z, t) (z itself for DDIM-like schedulers, x / sqrt(1 + sigma^2) for Euler),
# where Eq. 8 and Eq. 11 apply as written; the scheduler steps its own variable with the guided prediction.
SUPPORTED_SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
)


@dataclass
class GuidanceConfig:
    """Longtail Guidance settings. ``weight = 0`` with a signal still computes (and records) the signal."""

    signal: str = "total"
    weight: float = 0.0
    start: float = 0.0
    end: float = 1.0
    every: int = 1
    through_denoiser: bool = False  # also backpropagate through the denoiser (exact, ~2x the guidance cost)
    normalize: bool = False  # rescale the gradient to eps's RMS per sample (w becomes scale-free)
    on_noisy: bool = False  # A.7 ablation: guide on decoded z_t instead of the predicted clean latent

    def window(self) -> GuidanceWindow:
        return GuidanceWindow(self.start, self.end, self.every)


@dataclass
class StepRecord:
    """What one guided step saw: mean signal of the decoded predicted clean image, and the guidance size."""

    step: int
    timestep: int
    mean_signal: float
    grad_rms: float


@dataclass
class SampleResult:
    """Final images ``[B, C, H, W]`` and latents, plus per-sample records (``[B]`` each, when a classifier ran)."""

    images: Tensor
    latents: Tensor
    signal: Tensor | None = None
    p_class: Tensor | None = None
    pred: Tensor | None = None
    output: ClassifierOutput | None = None  # the classifier's output on the final images (all signals from it)
    signal_name: str | None = None
    nonfinite: int = 0  # (sample, step) pairs whose gradient was non-finite and fell back to unguided
    trajectory: list[StepRecord] = field(default_factory=list)
    seconds: float = 0.0


def check_scheduler(scheduler: object) -> None:
    """Refuse schedulers the loop cannot guide, and DDIM's ``clip_sample=True`` trap for latents."""
    name = type(scheduler).__name__
    if name not in SUPPORTED_SCHEDULERS:
        raise ValueError(
            f"scheduler {name} is not supported by the guided sampler; use one of {list(SUPPORTED_SCHEDULERS)} "
            "(variance-preserving, stepping on a noise prediction)"
        )
    config = getattr(scheduler, "config", {})
    if config.get("clip_sample", False):
        raise ValueError(
            f"{name} has clip_sample=True, which clamps predicted *latents* to [-1, 1] and collapses samples; "
            "build it with clip_sample=False"
        )
    if config.get("thresholding", False):
        raise ValueError(f"{name} has thresholding=True, which is meant for pixel-space models; disable it")


@contextlib.contextmanager
def frozen(module: object) -> Iterator[None]:
    """Eval mode and no parameter gradients for an ``nn.Module`` while sampling; both restored afterwards."""
    if not isinstance(module, nn.Module):
        yield
        return
    was_training = module.training
    flags = [p.requires_grad for p in module.parameters()]
    module.eval().requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        module.train(was_training)


def _alpha_bar(scheduler: object, alphas: Tensor, i: int, t: Tensor) -> Tensor:
    """``alpha_bar`` of step ``i``: from the scheduler's own sigma where it keeps one per step (Euler, DPM-Solver:
    ``a = 1 / (1 + sigma^2)``, exact for fractional timesteps), else ``alphas_cumprod[t]``."""
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, Tensor) and len(sigmas) == len(scheduler.timesteps) + 1:
        return 1.0 / (1.0 + sigmas[i].to(alphas.device, torch.float32) ** 2)
    return alphas[int(t)]


def initial_latents(
    seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Tensor:
    """z_T ``[B, *shape]``, one independent CPU generator per seed: a sample does not depend on its batch."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(
        device=device, dtype=dtype
    )


def _cfg_eps(
    denoiser: Denoiser, z: Tensor, t: Tensor, cond: Tensor, uncond: Tensor | None, cfg_scale: float,
    alpha_bar: Tensor, prediction_type: str,
) -> Tensor:
    """Classifier-free guidance ``eps_u + s (eps_c - eps_u)`` in noise space; one batched denoiser call."""
    if uncond is None or cfg_scale == 1.0:
        return eps_from_model_output(denoiser(z, t, cond), z, alpha_bar, prediction_type)
    out = denoiser(torch.cat([z, z]), t, torch.cat([uncond, cond]))
    out_u, out_c = out.chunk(2)
    eps_u = eps_from_model_output(out_u, z, alpha_bar, prediction_type)
    eps_c = eps_from_model_output(out_c, z, alpha_bar, prediction_type)
    return eps_u + cfg_scale * (eps_c - eps_u)


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    scheduler: object,
    decode: Callable[[Tensor], Tensor],
    cond: Tensor,
    latents: Tensor,
    *,
    uncond: Tensor | None = None,
    num_steps: int = 50,
    cfg_scale: float = 1.0,
    eta: float = 0.0,
    classifier: Callable[[Tensor], Tensor | ClassifierOutput] | None = None,
    labels: Tensor | None = None,
    guidance: GuidanceConfig | None = None,
    record_signal: str | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, Tensor, Tensor, Tensor, Tensor], None] | None = None,
    guide_decode: Callable[[Tensor], Tensor] | None = None,
) -> SampleResult:
    """Run the (optionally guided) sampler from ``latents`` = z_T ``[B, ...]``.

    ``cond``/``uncond``: conditioning batches for the denoiser (``uncond`` enables CFG with ``cfg_scale``).
    ``guidance=None`` is the plain sampler; with a ``GuidanceConfig`` the longtail gradient is computed on the
    window's steps and applied with its weight. ``labels [B]`` (intended classes) give P(class) records.
    ``record_signal`` names the signal recorded on the final images (default: the guidance signal, else
    entropy). ``on_step(i, t, z_vp, eps, alpha_bar)`` is called after each (unguided) eps, with the
    variance-preserving latent, for trajectory analyses.
    ``guide_decode`` replaces ``decode`` on the guidance path only (a cheap surrogate decoder).

    A classifier that is an ``nn.Module`` is put in eval mode with frozen parameters for the call (restored after).
    """
    with frozen(classifier):
        return _sample_loop(denoiser, scheduler, decode, cond, latents, uncond, num_steps, cfg_scale, eta,
                            classifier, labels, guidance, record_signal, generator, on_step, guide_decode)


def _sample_loop(denoiser, scheduler, decode, cond, latents, uncond, num_steps, cfg_scale, eta,
                 classifier, labels, guidance, record_signal, generator, on_step, guide_decode) -> SampleResult:
    """The body of ``sample`` (same arguments, positional)."""
    check_scheduler(scheduler)
    if latents.shape[0] != cond.shape[0]:
        raise ValueError(f"latents batch {latents.shape[0]} != cond batch {cond.shape[0]}")
    if guidance is not None and classifier is None:
        raise ValueError("guidance needs a classifier")
    started = time.perf_counter()
    scheduler.set_timesteps(num_steps, device=latents.device)
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    step_params = inspect.signature(scheduler.step).parameters
    step_kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in step_params}
    alphas = scheduler.alphas_cumprod.to(latents.device)
    window = guidance.window() if guidance is not None else None
    score_fn = make_score_fn(guide_decode or decode, classifier, guidance.signal) if guidance is not None else None

    z = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    result = SampleResult(images=torch.empty(0), latents=torch.empty(0))
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        a_t = _alpha_bar(scheduler, alphas, i, t).to(z.dtype)
        z_vp = scheduler.scale_model_input(z, t)  # the variance-preserving latent (z itself for DDIM)
        guide_now = window is not None and window.active(i, len(timesteps))
        lg = None
        if guide_now and guidance.through_denoiser and not guidance.on_noisy:
            # one denoiser pass with autograd on serves as both the step's eps and the gradient's path
            def eps_fn(zz: Tensor, _t: Tensor = t, _a: Tensor = a_t) -> Tensor:
                return _cfg_eps(denoiser, zz, _t, cond, uncond, cfg_scale, _a, prediction_type)
            lg = longtail_grad(z_vp, a_t, score_fn, eps_fn=eps_fn)
            eps = lg.eps
        else:
            eps = _cfg_eps(denoiser, z_vp, t, cond, uncond, cfg_scale, a_t, prediction_type)
        if on_step is not None:
            on_step(i, t, z_vp, eps, a_t)
        if guide_now:
            if lg is None:
                lg = longtail_grad(z_vp, a_t, score_fn, eps=eps, on_noisy=guidance.on_noisy)
            grad = normalize_grad(lg.grad, eps) if guidance.normalize else lg.grad
            result.nonfinite += int((~lg.finite).sum())
            result.trajectory.append(StepRecord(i, int(t), float(lg.score.mean()),
                                                float(grad.float().pow(2).mean().sqrt())))
            if guidance.weight != 0.0:
                eps = guided_eps(eps, grad, a_t, guidance.weight)
        output = model_output_from_eps(eps, z_vp, a_t, prediction_type)
        z = scheduler.step(output, t, z, **step_kwargs).prev_sample

    images = decode(z)
    result.images, result.latents = images, z
    if classifier is not None:
        name = record_signal or (guidance.signal if guidance is not None else "entropy")
        out = as_output(classifier(images))
        result.output = out
        if out.head_logits is None and get_signal(name).needs_heads:
            name = "entropy"
        result.signal_name = name
        result.signal = get_signal(name)(out.logits, out.head_logits).float()
        probs = out.logits.float().softmax(dim=-1)
        result.pred = probs.argmax(dim=-1)
        if labels is not None:
            result.p_class = probs.gather(1, labels.view(-1, 1).to(probs.device)).squeeze(1)
    result.seconds = time.perf_counter() - started
    return result
