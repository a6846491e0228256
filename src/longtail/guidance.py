"""Longtail Guidance as small functions (METHOD.md section 3, paper Eq. 8-11), and ``LongtailGuide``.

Notation: ``a_t`` is ``alpha_bar_t`` (the scheduler's ``alphas_cumprod[t]``), ``sigma_t = sqrt(1 - a_t)``.
``LongtailGuide`` composes the functions around a decoder and a classifier into one call per sampler step,
``guide(step, z_t, a_t, eps) -> guided eps`` (guided-diffusion's ``condition_score``); the sampler
(``longtail.sampling``) owns the loop and knows nothing of windows, normalisation or records.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .outputs import ClassifierOutput, as_output
from .signals import Signal, get_signal

ScoreFn = Callable[[Tensor], tuple[Tensor, ClassifierOutput]]


def predicted_z0(z_t: Tensor, eps: Tensor, alpha_bar_t: Tensor | float) -> Tensor:
    """Eq. 8, the predicted clean latent ``P(z_t) = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t)``. Shapes ``[B, ...]``."""
    a = torch.as_tensor(alpha_bar_t, dtype=z_t.dtype, device=z_t.device)
    return (z_t - (1 - a).sqrt() * eps) / a.sqrt()


def guided_eps(eps: Tensor, grad: Tensor, alpha_bar_t: Tensor | float, weight: float) -> Tensor:
    """Eq. 11, the biased noise estimate ``eps - w * sqrt(1 - a_t) * grad`` (``grad`` = d signal / d z_t)."""
    a = torch.as_tensor(alpha_bar_t, dtype=eps.dtype, device=eps.device)
    return eps - weight * (1 - a).sqrt() * grad.to(eps.dtype)


def eps_from_model_output(output: Tensor, z_t: Tensor, alpha_bar_t: Tensor | float, prediction_type: str) -> Tensor:
    """Convert a denoiser output (``epsilon``, ``v_prediction`` or ``sample``) to a noise estimate."""
    a = torch.as_tensor(alpha_bar_t, dtype=z_t.dtype, device=z_t.device)
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) z0  =>  eps = sqrt(a) v + sqrt(1-a) z_t
        return a.sqrt() * output + (1 - a).sqrt() * z_t
    if prediction_type == "sample":
        return (z_t - a.sqrt() * output) / (1 - a).sqrt()
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def model_output_from_eps(eps: Tensor, z_t: Tensor, alpha_bar_t: Tensor | float, prediction_type: str) -> Tensor:
    """Inverse of ``eps_from_model_output``: what the scheduler's ``step`` expects, from a (guided) eps."""
    a = torch.as_tensor(alpha_bar_t, dtype=z_t.dtype, device=z_t.device)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return (eps - (1 - a).sqrt() * z_t) / a.sqrt()
    if prediction_type == "sample":
        return predicted_z0(z_t, eps, a)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def make_score_fn(
    decode: Callable[[Tensor], Tensor],
    classifier: Callable[[Tensor], Tensor | ClassifierOutput],
    signal: Signal | str,
) -> ScoreFn:
    """Compose ``z0 [B, ...] -> (signal [B], ClassifierOutput)`` = signal(classifier(decode(z0)))."""
    sig = get_signal(signal) if isinstance(signal, str) else signal

    def score(z0: Tensor) -> tuple[Tensor, ClassifierOutput]:
        out = as_output(classifier(decode(z0)))
        return sig(out.logits, out.head_logits), out

    return score


@dataclass
class LongtailGrad:
    """Result of one guidance evaluation: ``grad`` d signal / d z_t ``[B, ...]``, ``score [B]``, classifier output."""

    grad: Tensor
    score: Tensor
    output: ClassifierOutput
    finite: Tensor  # [B] bool: False where the gradient had NaN/inf (the sample falls back to unguided)
    eps: Tensor | None = None  # the noise estimate used (computed here when eps_fn was given)


def longtail_grad(
    z_t: Tensor,
    alpha_bar_t: Tensor | float,
    score_fn: ScoreFn,
    eps: Tensor | None = None,
    eps_fn: Callable[[Tensor], Tensor] | None = None,
    on_noisy: bool = False,
) -> LongtailGrad:
    """Gradient ``[B, ...]`` of the longtail signal of the decoded predicted clean image w.r.t. ``z_t [B, ...]``.

    The ``g`` of Algorithm 1 (the input of Eq. 11). Three ways to get the noise estimate:
    * ``eps`` detached (the default): ``d z0 / d z_t = 1 / sqrt(a_t)`` (Eq. 8); costs one decoder +
      classifier forward and backward.
    * ``eps`` computed from ``z_t`` with autograd on (``z_t`` a leaf that requires grad): the gradient also
      flows through the denoiser (the exact total derivative) and the denoiser ran only once.
    * ``eps_fn`` given: eps is recomputed from ``z_t`` with autograd on, with the same exact derivative; costs
      an extra denoiser forward and backward.

    ``on_noisy=True`` is the naive ablation of the paper's A.7: score the decoded *noisy* latent ``z_t``
    itself instead of the predicted clean one (then ``eps`` is unused).

    Non-finite gradient entries are zeroed per sample and reported in ``finite``.

    Raises ``ValueError`` unless exactly one of ``eps`` / ``eps_fn`` is given, and when the signal does not
    depend on the latent (a detached classifier output).
    """
    if (eps is None) == (eps_fn is None):
        raise ValueError("pass exactly one of eps (detached denoiser) or eps_fn (gradient through denoiser)")
    with torch.enable_grad():
        attached = eps is not None and eps.requires_grad and z_t.requires_grad and z_t.is_leaf
        z = z_t if attached else z_t.detach().requires_grad_(True)
        e = eps if attached else (eps.detach() if eps is not None else None)
        if on_noisy:
            score, out = score_fn(z)
        else:
            e = e if e is not None else eps_fn(z)
            score, out = score_fn(predicted_z0(z, e, alpha_bar_t))
        if not score.requires_grad:
            raise ValueError(
                "the longtail signal does not depend on the latent: is the classifier's output detached? "
                "(an EpistemicClassifier detaches its head features while its base is trainable; freeze it with "
                "requires_grad_(False), as longtail.sampling.sample does)"
            )
        (grad,) = torch.autograd.grad(score.float().sum(), z)
    finite = torch.isfinite(grad).flatten(1).all(dim=1)
    if not bool(finite.all()):
        grad = torch.where(finite.view(-1, *([1] * (grad.dim() - 1))), grad, torch.zeros_like(grad))
    return LongtailGrad(grad=grad.detach(), score=score.detach(), output=out, finite=finite,
                        eps=e.detach() if e is not None else None)


def normalize_grad(grad: Tensor, eps: Tensor) -> Tensor:
    """Rescale each sample's gradient to the RMS of its noise estimate (optional guidance normalisation).

    With it, ``w`` is a fraction of the noise estimate's size, so one weight transfers across steps and models.
    """
    dims = tuple(range(1, grad.dim()))
    g_rms = grad.pow(2).mean(dim=dims, keepdim=True).sqrt()
    e_rms = eps.float().pow(2).mean(dim=dims, keepdim=True).sqrt()
    return grad * (e_rms / g_rms.clamp_min(1e-12))


@dataclass
class GuidanceWindow:
    """Guide only on steps whose fraction ``i / n`` lies in ``[start, end)`` and every ``every``-th of those."""

    start: float = 0.0
    end: float = 1.0
    every: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"guidance window needs 0 <= start < end <= 1, got start={self.start}, end={self.end}")
        if self.every < 1:
            raise ValueError(f"guidance 'every' must be >= 1, got {self.every}")

    def active(self, step_index: int, num_steps: int) -> bool:
        """Is step ``step_index`` (0 = the noisiest) of ``num_steps`` guided?"""
        first = math.ceil(self.start * num_steps)
        return self.start <= step_index / num_steps < self.end and (step_index - first) % self.every == 0


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
        """The steps to guide; raises ``ValueError`` for an empty or out-of-range window."""
        return GuidanceWindow(self.start, self.end, self.every)


@dataclass
class StepRecord:
    """What one guided step saw: mean signal of the decoded predicted clean image, and the guidance size."""

    step: int
    timestep: int
    mean_signal: float
    grad_rms: float


class LongtailGuide:
    """Longtail Guidance for one sampling run: ``guide(step, z_t, a_t, eps) -> guided eps`` (Eq. 11).

    Owns the guidance window, gradient normalisation, the through-denoiser and on-noisy (A.7) modes, the
    per-step ``records`` (``StepRecord``) and the ``nonfinite`` count ((sample, step) pairs whose gradient was
    non-finite and fell back to unguided). ``decode`` maps latents ``[B, ...]`` to the classifier's images
    ``[B, C, H, W]``; a cheaper ``guide_decode`` replaces it when given. ``num_steps`` is the number of sampler
    steps the window's fractions refer to. The classifier should be frozen (``longtail.sampling.frozen``).

    Raises ``ValueError`` for an invalid window, an unknown signal or ``num_steps < 1``.
    """

    def __init__(
        self,
        config: GuidanceConfig,
        classifier: Callable[[Tensor], Tensor | ClassifierOutput],
        decode: Callable[[Tensor], Tensor],
        *,
        num_steps: int,
        guide_decode: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.config, self.num_steps = config, num_steps
        self.window = config.window()
        self.score_fn = make_score_fn(guide_decode or decode, classifier, config.signal)
        self.records: list[StepRecord] = []
        self.nonfinite = 0

    def active(self, step_index: int) -> bool:
        """Does the window guide step ``step_index`` (0 = the noisiest)?"""
        return self.window.active(step_index, self.num_steps)

    def needs_denoiser_graph(self, step_index: int) -> bool:
        """Should the sampler compute this step's eps from ``z_t`` with autograd on (through-denoiser mode)?"""
        return self.config.through_denoiser and not self.config.on_noisy and self.active(step_index)

    def __call__(self, step_index: int, z: Tensor, a_t: Tensor | float, eps: Tensor, *,
                 timestep: Tensor | int | None = None) -> Tensor:
        """The guided noise estimate ``eps - w sqrt(1 - a_t) g`` ``[B, ...]`` (Eq. 11) at ``z = z_t [B, ...]``.

        ``eps [B, ...]`` is the (classifier-free guided) noise estimate at ``z``; ``g`` is the gradient of the
        signal of the decoded predicted clean image (Eq. 8), rescaled to eps's per-sample RMS when
        ``config.normalize``. Outside the window ``eps`` comes back unchanged (detached) and nothing is
        recorded; inside, one ``StepRecord`` is appended (``timestep`` is recorded as given, -1 when None).
        A sample whose gradient is non-finite keeps its ``eps`` and counts in ``nonfinite``.

        Through-denoiser mode: ``eps`` must have been computed from ``z`` with autograd on, ``z`` a leaf that
        requires grad, whenever ``needs_denoiser_graph(step_index)``; raises ``ValueError`` otherwise.
        """
        if not self.active(step_index):
            return eps.detach()
        if self.needs_denoiser_graph(step_index) and not (z.requires_grad and eps.requires_grad):
            raise ValueError("through_denoiser guidance needs eps computed from z with autograd on "
                             "(z a leaf with requires_grad; see needs_denoiser_graph)")
        attached = eps if self.needs_denoiser_graph(step_index) else eps.detach()
        lg = longtail_grad(z, a_t, self.score_fn, eps=attached, on_noisy=self.config.on_noisy)
        eps = eps.detach()
        grad = normalize_grad(lg.grad, eps) if self.config.normalize else lg.grad
        self.nonfinite += int((~lg.finite).sum())
        self.records.append(StepRecord(step_index, -1 if timestep is None else int(timestep),
                                       float(lg.score.mean()), float(grad.float().pow(2).mean().sqrt())))
        return eps if self.config.weight == 0.0 else guided_eps(eps, grad, a_t, self.config.weight)
