"""Longtail Guidance as small functions (METHOD.md section 3, paper Eq. 8-11).

Notation: ``a_t`` is ``alpha_bar_t`` (the scheduler's ``alphas_cumprod[t]``), ``sigma_t = sqrt(1 - a_t)``.
The sampler (``longtail.sampling``) composes these around any denoiser, decoder and classifier.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .heads import ClassifierOutput, as_output
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
    """Gradient of the longtail signal of the decoded predicted clean image w.r.t. ``z_t`` (Algorithm 1).

    Two modes:
    * ``eps`` given (denoiser detached, the default): ``d z0 / d z_t = 1 / sqrt(a_t)``; costs one decoder +
      classifier forward and backward.
    * ``eps_fn`` given: eps is recomputed from ``z_t`` with autograd on, so the gradient also flows through
      the denoiser (the exact total derivative); costs an extra denoiser forward and backward.

    ``on_noisy=True`` is the naive ablation of the paper's A.7: score the decoded *noisy* latent ``z_t``
    itself instead of the predicted clean one (then ``eps`` is unused).

    Non-finite gradient entries are zeroed per sample and reported in ``finite``.
    """
    if (eps is None) == (eps_fn is None):
        raise ValueError("pass exactly one of eps (detached denoiser) or eps_fn (gradient through denoiser)")
    with torch.enable_grad():
        z = z_t.detach().requires_grad_(True)
        e = eps.detach() if eps is not None else None
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
