"""Longtail Guidance as small functions (METHOD.md section 3, paper Eq. 8-11), and ``LongtailGuide``.

Notation: ``a_t`` is ``alpha_bar_t`` (the scheduler's ``alphas_cumprod[t]``), ``sigma_t = sqrt(1 - a_t)``.
Flow matching (rectified flow, diffusers' ``FlowMatchEulerDiscreteScheduler``): ``x_s = (1 - s) x0 + s n`` and
the model predicts the velocity ``v = n - x0``; ``predicted_x0_flow`` and ``guided_velocity`` are Eq. 8 and
Eq. 11 on that path (derivation in ``guided_velocity``), and ``LongtailGuide(..., flow=True)`` uses them.
``LongtailGuide`` composes the functions around a decoder and a classifier into one call per sampler step,
``guide(step, z_t, a_t, eps) -> guided eps`` (guided-diffusion's ``condition_score``); the sampler
(``longtail.sampling``) owns the loop and knows nothing of windows, normalisation or records.

On-manifold options (METHOD.md section 7, "hard but real"; all off by default, all exact no-ops at ``w = 0``):
augmentation-averaged signal (``views``: CLIP-guided diffusion's cutouts), manifold projection (``project``:
MPGD, He et al. 2024), a low-pass filter on the latent gradient (``lowpass``) and recurrence / time travel
(``recurrence``: Universal Guidance, Bansal et al. 2023; FreeDoM, Yu et al. 2023; it lives in the sampler loop).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
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


# --- flow matching (rectified flow): Eq. 8 and Eq. 11 on x_s = (1 - s) x0 + s n, v = n - x0 ------------------


def predicted_x0_flow(x_t: Tensor, velocity: Tensor, sigma: Tensor | float) -> Tensor:
    """Eq. 8 on a rectified-flow path: the predicted clean latent ``x0_hat = x_s - s v``. Shapes ``[B, ...]``.

    On ``x_s = (1 - s) x0 + s n`` (``s`` = ``sigma``, the scheduler's ``sigmas[i]`` in [0, 1]) a velocity model
    predicts ``v = n - x0``; eliminating ``n = x0 + v`` gives ``x_s = x0 + s v``, hence ``x0 = x_s - s v``.
    Unlike Eq. 8 this stays finite at pure noise (``s = 1``: ``x0_hat = x_1 - v``), and with ``v`` held
    fixed ``d x0_hat / d x_s`` is the identity (Eq. 8's is ``1 / sqrt(a_t)``). Source: Liu et al. 2023
    (rectified flow), Esser et al. 2024 (SD3); diffusers' ``FlowMatchEulerDiscreteScheduler.step``.
    """
    s = torch.as_tensor(sigma, dtype=x_t.dtype, device=x_t.device)
    return x_t - s * velocity


def flow_guidance_scale(sigma: Tensor | float) -> Tensor:
    """The factor ``s / (1 - s)`` that ``guided_velocity`` puts in front of ``w * grad`` (a 0-dim tensor).

    Raises ``ValueError`` at ``s >= 1`` (pure noise), where the factor is unbounded (see ``guided_velocity``).
    """
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if not bool(s < 1):
        raise ValueError(f"flow-matching guidance is undefined at sigma = {float(s)} >= 1 (pure noise): "
                         "x_1 holds no information about x0, and Eq. 11's factor s / (1 - s) is unbounded")
    return s / (1 - s)


def guided_velocity(velocity: Tensor, grad: Tensor, sigma: Tensor | float, weight: float) -> Tensor:
    """Eq. 11 on a rectified-flow path: the guided velocity ``v - w * s / (1 - s) * grad``. Shapes ``[B, ...]``.

    ``grad`` is d signal / d x_s (the gradient of the signal of the decoded ``predicted_x0_flow``).

    Derivation. Eq. 11 is classifier guidance on the score: the noise estimate is ``-sigma_t`` times the
    score, so adding ``w * grad`` to the score gives ``eps - w sigma_t grad``. On the flow path the noise has
    standard deviation ``s`` given ``x0``, so the noise estimate is ``n_hat = -s * score``; with ``x_s`` fixed,
    ``x_s = (1 - s) x0_hat + s n_hat`` ties ``x0_hat`` to it, and ``v = n_hat - x0_hat``. Then

    * ``n_hat' = n_hat - w s grad``                                (Eq. 11 with sigma_t = s)
    * ``x0_hat' = (x_s - s n_hat') / (1 - s) = x0_hat + w s^2 / (1 - s) grad``
    * ``v' = n_hat' - x0_hat' = v - w s (1 + s / (1 - s)) grad = v - w s / (1 - s) grad``.

    The same result comes from rewriting the flow path in variance-preserving form: ``z = x_s / r`` with
    ``r = sqrt((1 - s)^2 + s^2)`` has ``sqrt(a_t) = (1 - s) / r``, ``sqrt(1 - a_t) = s / r``, eps = ``n_hat``
    and d signal / dz = ``r grad``, so Eq. 11 reads ``eps - w (s / r) r grad = n_hat - w s grad`` as above:
    at equal ``w`` the predicted clean latent moves exactly as much as under Eq. 11 on the equivalent
    diffusion (``(1 - a_t) / sqrt(a_t) * d/dz = s^2 / (1 - s) * d/dx``). ``w = 0`` returns ``velocity``'s
    values. At ``s = 1`` (the first step of a flow schedule) the factor is unbounded and ``ValueError`` is
    raised (``flow_guidance_scale``); ``LongtailGuide`` leaves that step unguided.
    """
    scale = flow_guidance_scale(sigma).to(device=velocity.device, dtype=velocity.dtype)
    return velocity - weight * scale * grad.to(velocity.dtype)


def noise_from_velocity(x_t: Tensor, velocity: Tensor, sigma: Tensor | float) -> Tensor:
    """The predicted noise ``n_hat = x_s + (1 - s) v`` ``[B, ...]`` (eps's analogue on the flow path)."""
    s = torch.as_tensor(sigma, dtype=x_t.dtype, device=x_t.device)
    return x_t + (1 - s) * velocity


def project_velocity(x_t: Tensor, velocity: Tensor, sigma: Tensor | float, decode: Callable[[Tensor], Tensor],
                     encode: Callable[[Tensor], Tensor]) -> Tensor:
    """MPGD manifold projection on a flow path: ``x0_p = encode(decode(x_s - s v))``, ``v_p = (x_s - x0_p) / s``.

    The velocity whose predicted clean latent (``predicted_x0_flow``) is the autoencoder's projection of the
    given one; ``project_eps``'s flow analogue. Shapes ``[B, ...]``; ``sigma > 0``. No autograd.
    """
    s = torch.as_tensor(sigma, dtype=velocity.dtype, device=velocity.device)
    with torch.no_grad():
        x0_p = encode(decode(predicted_x0_flow(x_t, velocity, s))).to(velocity.dtype)
        return (x_t.to(velocity.dtype) - x0_p) / s


def make_score_fn(
    decode: Callable[[Tensor], Tensor],
    classifier: Callable[[Tensor], Tensor | ClassifierOutput],
    signal: Signal | str,
    views: Callable[[Tensor], Tensor] | None = None,
) -> ScoreFn:
    """Compose ``z0 [B, ...] -> (signal [B], ClassifierOutput)`` = signal(classifier(decode(z0))).

    With ``views`` (images ``[B, C, H, W]`` -> ``[n * B, C, H, W]``, view-major, e.g. ``random_views``) the
    decoder still runs once, the classifier once on all ``n * B`` views, and the signal is the mean over the
    ``n`` views of each sample (the augmentation-averaged signal); the output returned is the first view's.
    """
    sig = get_signal(signal) if isinstance(signal, str) else signal

    def score(z0: Tensor) -> tuple[Tensor, ClassifierOutput]:
        images = decode(z0)
        if views is None:
            out = as_output(classifier(images))
            return sig(out.logits, out.head_logits), out
        batch = images.shape[0]
        out = as_output(classifier(views(images)))
        per_view = sig(out.logits, out.head_logits).view(-1, batch)  # [n, B]
        first = ClassifierOutput(logits=out.logits[:batch],
                                 head_logits=None if out.head_logits is None else out.head_logits[:batch])
        return per_view.mean(dim=0), first

    return score


def option_generator(seed: int, step_index: int, repeat: int = 0, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded by (config seed, step, recurrence pass, stream): the options' randomness repeats.

    ``stream`` separates independent uses within one pass (0: views, 1: recurrence re-noising).
    """
    mixed = (seed * 1_000_003 + step_index * 7919 + repeat * 104_729 + stream * 15_485_863) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def view_transforms(n: int, shift: float, crop: float, flip: bool, generator: torch.Generator) -> Tensor:
    """``n`` random affine maps ``[n, 2, 3]`` (``F.affine_grid``'s output-to-input convention, float64, CPU).

    Each view zooms in by a factor ``s ~ U[1 - crop, 1]`` (a crop covering ``s`` of each side), translates by
    up to ``shift`` of the image size along each axis (a shift of ``f`` of the size is ``2 f`` in normalised
    coordinates) and, when ``flip``, mirrors horizontally with probability 1/2. Draws 4 uniforms per view
    from ``generator`` whatever the settings, so a setting does not change the others' draws.
    """
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    scale = 1.0 - crop * u[:, 0]
    tx, ty = 2.0 * shift * (2.0 * u[:, 1] - 1.0), 2.0 * shift * (2.0 * u[:, 2] - 1.0)
    mirror = torch.where(u[:, 3] < 0.5, -1.0, 1.0) if flip else torch.ones(n, dtype=torch.float64)
    zero = torch.zeros(n, dtype=torch.float64)
    return torch.stack([torch.stack([mirror * scale, zero, tx], 1), torch.stack([zero, scale, ty], 1)], 1)


def apply_views(images: Tensor, thetas: Tensor) -> Tensor:
    """Resample ``images [B, C, H, W]`` with each of ``thetas [n, 2, 3]``: views ``[n * B, C, H, W]``, view-major.

    Bilinear ``F.grid_sample`` (differentiable in the images) with reflection padding, so shifted-in borders
    are image content, not black. The identity map reproduces the images up to float rounding.
    """
    n, (b, c, h, w) = thetas.shape[0], images.shape
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32  # affine_grid: no half on CPU
    theta = thetas.to(images.device, dtype).repeat_interleave(b, dim=0)  # [n * B, 2, 3]
    grid = F.affine_grid(theta, [n * b, c, h, w], align_corners=False).to(images.dtype)
    return F.grid_sample(images.repeat(n, 1, 1, 1), grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def random_views(images: Tensor, n: int, *, shift: float, crop: float, flip: bool,
                 generator: torch.Generator) -> Tensor:
    """``n`` random differentiable views ``[n * B, C, H, W]`` of ``images [B, C, H, W]`` (``view_transforms``).

    Every sample gets the same ``n`` maps, so a sample's views do not depend on its batch.
    """
    return apply_views(images, view_transforms(n, shift, crop, flip, generator))


def gaussian_kernel1d(sigma: float) -> Tensor:
    """Normalised 1-D Gaussian ``exp(-x^2 / (2 sigma^2))`` on ``x = -r..r``, ``r = max(1, ceil(3 sigma))``,
    float64 ``[2r + 1]``. Raises ``ValueError`` for ``sigma <= 0``."""
    if not sigma > 0:
        raise ValueError(f"lowpass sigma must be > 0 for a kernel, got {sigma}")
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def lowpass_grad(grad: Tensor, sigma: float) -> Tensor:
    """Gaussian blur (std ``sigma`` latent pixels) of a latent gradient ``[B, ..., h, w]`` over its last two dims.

    Each channel is blurred on its own with a separable, normalised kernel (``gaussian_kernel1d``) and
    replicate padding, so a constant gradient is unchanged; ``sigma = 0`` returns ``grad`` itself. The
    cheapest on-manifold option: it removes the high-frequency (adversarial) part of the gradient.
    Raises ``ValueError`` for ``sigma < 0`` and for a gradient without two spatial dims.
    """
    if sigma < 0:
        raise ValueError(f"lowpass must be >= 0, got {sigma}")
    if sigma == 0:
        return grad
    if grad.dim() < 3:
        raise ValueError(f"lowpass needs spatial latents [B, C, h, w]; the gradient has shape {list(grad.shape)}")
    kernel = gaussian_kernel1d(sigma).to(grad.device, torch.float32)
    r = (kernel.numel() - 1) // 2
    x = grad.float().reshape(-1, 1, *grad.shape[-2:])
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x.reshape(grad.shape).to(grad.dtype)


def project_eps(z_t: Tensor, eps: Tensor, alpha_bar_t: Tensor | float, decode: Callable[[Tensor], Tensor],
                encode: Callable[[Tensor], Tensor]) -> Tensor:
    """Manifold projection of a (guided) noise estimate through the autoencoder (MPGD, He et al. 2024).

    ``z0 = (z_t - sqrt(1 - a) eps) / sqrt(a)`` (Eq. 8), ``z0_p = encode(decode(z0))``, and back:
    ``eps_p = (z_t - sqrt(a) z0_p) / sqrt(1 - a)``, so the step lands on the predicted clean latent that the
    autoencoder can reproduce. Shapes ``[B, ...]``; ``encode`` must invert ``decode``'s scaling. No autograd.
    """
    a = torch.as_tensor(alpha_bar_t, dtype=eps.dtype, device=eps.device)
    with torch.no_grad():
        z0_p = encode(decode(predicted_z0(z_t, eps, a))).to(eps.dtype)
        return (z_t.to(eps.dtype) - a.sqrt() * z0_p) / (1 - a).sqrt()


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
    to_z0: Callable[[Tensor, Tensor, Tensor | float], Tensor] = predicted_z0,
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

    ``to_z0(z_t, eps, level)`` maps the model's prediction to the predicted clean latent: ``predicted_z0``
    (Eq. 8, ``level`` = a_t) by default; ``predicted_x0_flow`` for a velocity model (``eps`` = v,
    ``level`` = sigma; then ``d z0 / d z_t`` is the identity with v detached).

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
            score, out = score_fn(to_z0(z, e, alpha_bar_t))
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
    """Longtail Guidance settings. ``weight = 0`` with a signal still computes (and records) the signal.

    On-manifold options (all off by default; with ``weight = 0`` the sample is bit-identical to unguided):

    * ``views`` > 1: the signal is averaged over ``views`` random differentiable views of the decoded image
      (crop to ``1 - view_crop`` .. 1 of each side, shift up to ``view_shift`` of the image size, horizontal
      flip when ``view_flip``); the decoder runs once, the classifier on all views in one batch. Views are
      drawn from ``option_generator(seed, step, pass)``, the same for every sample of the batch.
    * ``project``: the guided predicted clean latent goes through decode-then-encode before the step (MPGD);
      needs an ``encode`` function.
    * ``recurrence`` = r > 0: each guided step is redone r times after re-noising back to its level (Universal
      Guidance / FreeDoM), r extra denoiser calls per guided step; stateless schedulers only (``sampling``).
    * ``lowpass`` = sigma > 0: Gaussian blur (sigma in latent pixels) of the latent gradient before
      normalisation and Eq. 11.
    """

    signal: str = "total"
    weight: float = 0.0
    start: float = 0.0
    end: float = 1.0
    every: int = 1
    through_denoiser: bool = False  # also backpropagate through the denoiser (exact, ~2x the guidance cost)
    normalize: bool = False  # rescale the gradient to eps's RMS per sample (w becomes scale-free)
    on_noisy: bool = False  # A.7 ablation: guide on decoded z_t instead of the predicted clean latent
    views: int = 1  # random views whose signal is averaged (1: the decoded image itself)
    view_shift: float = 0.1  # max shift of a view, fraction of the image size per axis (views > 1 only)
    view_crop: float = 0.1  # max zoom-in of a view: it covers 1 - view_crop .. 1 of each side (views > 1 only)
    view_flip: bool = True  # mirror each view horizontally with probability 1/2 (views > 1 only)
    project: bool = False  # MPGD manifold projection z0 -> encode(decode(z0)) of the guided clean latent
    recurrence: int = 0  # redo each guided step this many times after re-noising (Universal Guidance)
    lowpass: float = 0.0  # Gaussian blur sigma (latent pixels) of the latent gradient; 0 = off
    seed: int = 0  # seed of the options' randomness (views, recurrence noise), mixed with the step index

    def window(self) -> GuidanceWindow:
        """The steps to guide; raises ``ValueError`` for an empty or out-of-range window."""
        return GuidanceWindow(self.start, self.end, self.every)

    def check(self) -> None:
        """Validate the on-manifold options; raises ``ValueError`` naming the setting.

        ``views < 1``; ``view_shift`` outside [0, 0.5]; ``view_crop`` outside [0, 1); ``views > 1`` with no
        augmentation (the views would be identical); ``recurrence < 0``; ``lowpass`` negative or not finite.
        """
        if self.views < 1:
            raise ValueError(f"guidance views must be >= 1, got {self.views}")
        if not 0.0 <= self.view_shift <= 0.5:
            raise ValueError(f"guidance view_shift must lie in [0, 0.5] (a fraction of the size), got {self.view_shift}")
        if not 0.0 <= self.view_crop < 1.0:
            raise ValueError(f"guidance view_crop must lie in [0, 1), got {self.view_crop}")
        if self.views > 1 and self.view_shift == 0 and self.view_crop == 0 and not self.view_flip:
            raise ValueError(f"guidance views={self.views} with view_shift=0, view_crop=0 and view_flip=False "
                             "would score identical views; set an augmentation or views=1")
        if self.recurrence < 0:
            raise ValueError(f"guidance recurrence must be >= 0, got {self.recurrence}")
        if not (math.isfinite(self.lowpass) and self.lowpass >= 0):
            raise ValueError(f"guidance lowpass (a blur sigma) must be finite and >= 0, got {self.lowpass}")

    def with_options(self, **options: object) -> GuidanceConfig:
        """A checked copy with ``options`` set, e.g. ``cfg.with_options(views=4, lowpass=1.0)``.

        Raises ``ValueError`` naming an unknown option (and the known ones), or a bad value (``check``).
        """
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown guidance option(s) {unknown}; known: {sorted(known)}")
        new = replace(self, **options)
        new.check()
        return new


@dataclass
class StepRecord:
    """What one guided step saw: mean signal of the decoded predicted clean image, and the guidance size."""

    step: int
    timestep: int
    mean_signal: float
    grad_rms: float
    repeat: int = 0  # the recurrence pass (0 = the first)


class LongtailGuide:
    """Longtail Guidance for one sampling run: ``guide(step, z_t, a_t, eps) -> guided eps`` (Eq. 11).

    Owns the guidance window, gradient normalisation, the through-denoiser and on-noisy (A.7) modes, the
    on-manifold options of ``GuidanceConfig`` but recurrence (views, projection, low-pass; recurrence lives in
    the sampler loop), the per-step ``records`` (``StepRecord``) and the ``nonfinite`` count ((sample, step)
    pairs whose gradient was non-finite and fell back to unguided). ``decode`` maps latents ``[B, ...]`` to
    the classifier's images ``[B, C, H, W]``; a cheaper ``guide_decode`` replaces it on the gradient path when
    given. ``encode`` (images -> latents, inverting ``decode``'s scaling) is needed by ``config.project`` and
    used with ``decode``. ``num_steps`` is the number of sampler steps the window's fractions refer to. The
    classifier should be frozen (``longtail.sampling.frozen``).

    ``flow=True``: a rectified-flow (velocity) model. The call is then ``guide(step, x_s, sigma, v) -> guided
    v``: the ``a_t`` argument carries ``sigma`` and ``eps`` the velocity, Eq. 8 is ``predicted_x0_flow``,
    Eq. 11 ``guided_velocity``, projection ``project_velocity``, and normalisation uses the velocity's RMS.
    A step at ``sigma >= 1`` (pure noise, where Eq. 11's flow factor is unbounded) is left unguided and
    unrecorded.

    Raises ``ValueError`` for an invalid window or option (``GuidanceConfig.check``), an unknown signal,
    ``num_steps < 1``, or ``project`` without ``encode``.
    """

    def __init__(
        self,
        config: GuidanceConfig,
        classifier: Callable[[Tensor], Tensor | ClassifierOutput],
        decode: Callable[[Tensor], Tensor],
        *,
        num_steps: int,
        guide_decode: Callable[[Tensor], Tensor] | None = None,
        encode: Callable[[Tensor], Tensor] | None = None,
        flow: bool = False,
    ) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        config.check()
        if config.project and encode is None:
            raise ValueError("guidance project=True needs an encode function (latent from image, inverting "
                             "decode's scaling; sample(encode=...), LatentDiffusion.encode)")
        self.config, self.num_steps, self.flow = config, num_steps, flow
        self.window = config.window()
        self.decode, self.encode = decode, encode
        self._guide_decode, self._classifier = guide_decode or decode, classifier
        self._signal = get_signal(config.signal)
        self.score_fn = make_score_fn(self._guide_decode, classifier, self._signal)
        self.records: list[StepRecord] = []
        self.nonfinite = 0

    def active(self, step_index: int) -> bool:
        """Does the window guide step ``step_index`` (0 = the noisiest)?"""
        return self.window.active(step_index, self.num_steps)

    def guides(self, step_index: int, level: Tensor | float) -> bool:
        """Is step ``step_index`` at ``level`` (a_t, or sigma in flow mode) guided: in the window and, for flow,
        below pure noise (``sigma < 1``)?"""
        return self.active(step_index) and (not self.flow or bool(torch.as_tensor(level) < 1))

    def needs_denoiser_graph(self, step_index: int) -> bool:
        """Should the sampler compute this step's eps from ``z_t`` with autograd on (through-denoiser mode)?"""
        return self.config.through_denoiser and not self.config.on_noisy and self.active(step_index)

    def score_fn_for(self, step_index: int, repeat: int = 0) -> ScoreFn:
        """The score function of one guided pass: plain, or averaged over this pass's seeded random views."""
        c = self.config
        if c.views == 1:
            return self.score_fn
        gen = option_generator(c.seed, step_index, repeat, stream=0)

        def views(images: Tensor) -> Tensor:
            return random_views(images, c.views, shift=c.view_shift, crop=c.view_crop, flip=c.view_flip,
                                generator=gen)

        return make_score_fn(self._guide_decode, self._classifier, self._signal, views=views)

    def shape_grad(self, grad: Tensor, eps: Tensor) -> Tensor:
        """The gradient Eq. 11 uses: low-pass filtered (``config.lowpass``), then normalised (``config.normalize``)."""
        grad = lowpass_grad(grad, self.config.lowpass)
        return normalize_grad(grad, eps) if self.config.normalize else grad

    def __call__(self, step_index: int, z: Tensor, a_t: Tensor | float, eps: Tensor, *,
                 timestep: Tensor | int | None = None, repeat: int = 0) -> Tensor:
        """The guided noise estimate ``eps - w sqrt(1 - a_t) g`` ``[B, ...]`` (Eq. 11) at ``z = z_t [B, ...]``.

        ``eps [B, ...]`` is the (classifier-free guided) noise estimate at ``z``; ``g`` is the gradient of the
        signal of the decoded predicted clean image (Eq. 8; averaged over views when ``config.views > 1``),
        low-pass filtered and rescaled per ``config`` (``shape_grad``); with ``config.project`` the result goes
        through ``project_eps`` (MPGD). Outside the window ``eps`` comes back unchanged (detached) and nothing
        is recorded; inside, one ``StepRecord`` is appended (``timestep`` as given, -1 when None; ``repeat``
        is the recurrence pass, which also seeds the views). At ``weight = 0`` ``eps`` comes back unchanged
        (detached), whatever the options. A sample whose gradient is non-finite keeps its ``eps`` (not
        projected) and counts in ``nonfinite``.

        Through-denoiser mode: ``eps`` must have been computed from ``z`` with autograd on, ``z`` a leaf that
        requires grad, whenever ``needs_denoiser_graph(step_index)``; raises ``ValueError`` otherwise.
        """
        if not self.guides(step_index, a_t):
            return eps.detach()
        if self.needs_denoiser_graph(step_index) and not (z.requires_grad and eps.requires_grad):
            raise ValueError("through_denoiser guidance needs eps computed from z with autograd on "
                             "(z a leaf with requires_grad; see needs_denoiser_graph)")
        attached = eps if self.needs_denoiser_graph(step_index) else eps.detach()
        lg = longtail_grad(z, a_t, self.score_fn_for(step_index, repeat), eps=attached,
                           on_noisy=self.config.on_noisy, to_z0=predicted_x0_flow if self.flow else predicted_z0)
        eps = eps.detach()
        grad = self.shape_grad(lg.grad, eps)
        self.nonfinite += int((~lg.finite).sum())
        self.records.append(StepRecord(step_index, -1 if timestep is None else int(timestep),
                                       float(lg.score.mean()), float(grad.float().pow(2).mean().sqrt()), repeat))
        if self.config.weight == 0.0:
            return eps
        bias = guided_velocity if self.flow else guided_eps
        guided = bias(eps, grad, a_t, self.config.weight)
        return self._project(z.detach(), guided, a_t, eps, lg.finite) if self.config.project else guided

    def _project(self, z: Tensor, guided: Tensor, a_t: Tensor | float, eps: Tensor, finite: Tensor) -> Tensor:
        """``project_eps`` (``project_velocity`` for flow) of the guided prediction; samples whose gradient was
        non-finite keep their unguided one."""
        projected = (project_velocity if self.flow else project_eps)(z, guided, a_t, self.decode, self.encode)
        return torch.where(finite.view(-1, *([1] * (eps.dim() - 1))), projected, eps)
