"""The guided sampling loop (paper Algorithm 1), written out over plain callables.

Parts, all supplied by the caller so the same loop serves the embedded model and Stable Diffusion:

* ``denoiser(z_t [B,...], t [] , cond [B,...]) -> model output`` (eps, v or x0, per the scheduler's config)
* a diffusers scheduler (DDIM first; any variance-preserving one whose ``step`` takes a noise prediction)
* ``decode(z [B,...]) -> image [B, C, H, W]`` (the VAE decoder, scaling included); optionally a cheaper
  ``guide_decode`` used only on the guidance path (a distilled or TAESD-style decoder), final images still
  come from ``decode``
* ``classifier(image) -> logits [B, C] | ClassifierOutput`` (optional; needed for guidance and records)

Per step: classifier-free guidance gives eps; a ``LongtailGuide`` (``longtail.guidance``) turns it into the
guided eps (Eq. 11) before the scheduler step (Eq. 7). Everything about guidance lives in the guide, except
recurrence (Universal Guidance's time travel), which redoes a whole step and so belongs to the loop.

Flow matching (SD3 and later; ``FlowMatchEulerDiscreteScheduler``): the denoiser predicts a velocity on
``x_s = (1 - s) x0 + s n``; classifier-free guidance mixes velocities as diffusers' pipelines do, and the guide
biases the velocity (``longtail.guidance.guided_velocity``, Eq. 11's analogue) before the Euler step.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .guidance import (
    GuidanceConfig,
    LongtailGuide,
    StepRecord,
    eps_from_model_output,
    model_output_from_eps,
    option_generator,
    predicted_x0_flow,
    predicted_z0,
)
from .outputs import ClassifierOutput, as_output
from .signals import get_signal

# GuidanceConfig and StepRecord live in longtail.guidance; `from longtail.sampling import GuidanceConfig` stays valid.

Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]
StepCallback = Callable[[dict[str, Any]], None]

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
# Schedulers whose `step` keeps no state but the step index, so a step can be redone (guidance recurrence).
RECURRENT_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
# Schedulers that step the sigma-space variable x = z_vp / sqrt(a) rather than z_vp itself.
SIGMA_SPACE_SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
# Flow-matching schedulers: the model output is a velocity v = n - x0 on x_s = (1 - s) x0 + s n.
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


def is_flow_scheduler(scheduler: object) -> bool:
    """Does ``scheduler`` step a rectified flow (velocity predictions) rather than a variance-preserving chain?

    True for the classes in ``FLOW_SCHEDULERS`` and their subclasses (e.g. ``longtail.models.flow``'s
    ``FluxFlowMatchScheduler``, which bakes FLUX's resolution-dependent schedule into ``set_timesteps``), and
    for a scheduler configured with ``prediction_type="flow_prediction"`` (DPM-Solver++ with flow sigmas, as
    Sana ships); each keeps the flow level ``s`` of step ``i`` in ``sigmas[i]``."""
    if any(c.__name__ in FLOW_SCHEDULERS for c in type(scheduler).__mro__):
        return True
    return getattr(scheduler, "config", {}).get("prediction_type") == "flow_prediction"


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
    denoiser_calls: int = 0  # denoiser invocations (a CFG pair is one batched call)
    recurrence_calls: int = 0  # of which spent redoing guided steps (guidance recurrence)
    # what the decoder had to fall back to during this call (e.g. "vae upcast fp16->fp32: non-finite decode"),
    # from the generator's ``decode_fallbacks`` notes; images still non-finite after decoding:
    fallbacks: list[str] = field(default_factory=list)
    nonfinite_images: int = 0


def check_scheduler(scheduler: object) -> None:
    """Refuse schedulers the loop cannot guide, and DDIM's ``clip_sample=True`` trap for latents."""
    name = type(scheduler).__name__
    if name not in SUPPORTED_SCHEDULERS and not is_flow_scheduler(scheduler):
        raise ValueError(
            f"scheduler {name} is not supported by the guided sampler; use one of {list(SUPPORTED_SCHEDULERS)} "
            f"(variance-preserving, stepping on a noise prediction) or {list(FLOW_SCHEDULERS)} (flow matching)"
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


def cfg_text(cond: Tensor, uncond: Tensor | None, cfg_scale: float) -> Tensor | None:
    """The denoiser's text batch under CFG, ``cat([uncond, cond])`` ``[2B, ...]``; None without CFG. Built once
    per sampling call: the same tensor at every step lets the UNet reuse its cross-attention keys / values
    (``longtail.models.text_kv``)."""
    return None if uncond is None or cfg_scale == 1.0 else torch.cat([uncond, cond])


def _cfg_eps(
    denoiser: Denoiser, z: Tensor, t: Tensor, cond: Tensor, both: Tensor | None, cfg_scale: float,
    alpha_bar: Tensor, prediction_type: str,
) -> Tensor:
    """Classifier-free guidance ``eps_u + s (eps_c - eps_u)`` in noise space; one batched denoiser call on
    ``both`` (``cfg_text``; None: no CFG, ``cond`` alone)."""
    if both is None:
        return eps_from_model_output(denoiser(z, t, cond), z, alpha_bar, prediction_type)
    out = denoiser(torch.cat([z, z]), t, both)
    out_u, out_c = out.chunk(2)
    eps_u = eps_from_model_output(out_u, z, alpha_bar, prediction_type)
    eps_c = eps_from_model_output(out_c, z, alpha_bar, prediction_type)
    return eps_u + cfg_scale * (eps_c - eps_u)



def check_num_steps(num_steps: int, train_timesteps: int | None, setting: str = "num_steps") -> None:
    """Refuse a step count the scheduler cannot run: an integer ``1 <= num_steps < train_timesteps`` (the
    scheduler's ``num_train_timesteps``; only the lower bound when unknown). ``ValueError`` names ``setting``
    and the allowed range (diffusers would fail later with an IndexError, a division by zero, or sample
    nothing at all)."""
    upper = f"{train_timesteps - 1}" if train_timesteps else "the scheduler's training timesteps - 1"
    valid = isinstance(num_steps, int) and not isinstance(num_steps, bool) and num_steps >= 1
    if not valid or (train_timesteps is not None and num_steps >= train_timesteps):
        trained = f" (the scheduler was trained with {train_timesteps} timesteps)" if train_timesteps else ""
        raise ValueError(f"{setting} must be an integer from 1 to {upper}{trained}, got {num_steps!r}")


def _check_inputs(scheduler: object, cond: Tensor, latents: Tensor, guidance: GuidanceConfig | None,
                  classifier: object, encode: object, num_steps: int,
                  timestep_kwargs: Mapping[str, object] | None = None) -> None:
    """Refuse what the loop cannot run, before any denoiser call (``ValueError``)."""
    check_scheduler(scheduler)
    check_num_steps(num_steps, getattr(scheduler, "config", {}).get("num_train_timesteps"))
    flow = is_flow_scheduler(scheduler)
    supplies_mu = getattr(scheduler, "image_seq_len", None) is not None  # FluxFlowMatchScheduler: its own mu
    if (flow and scheduler.config.get("use_dynamic_shifting", False) and not supplies_mu
            and "mu" not in (timestep_kwargs or {})):
        raise ValueError(f"{type(scheduler).__name__} has use_dynamic_shifting=True: pass "
                         "timestep_kwargs={'mu': ...} (the resolution-dependent shift)")
    if latents.shape[0] != cond.shape[0]:
        raise ValueError(f"latents batch {latents.shape[0]} != cond batch {cond.shape[0]}")
    if guidance is None:
        return
    if classifier is None:
        raise ValueError("guidance needs a classifier")
    guidance.check()
    if guidance.project and encode is None:
        raise ValueError("guidance project=True needs sample(encode=...) (latent from image, inverting decode)")
    name = type(scheduler).__name__
    flow_euler = any(c.__name__ == "FlowMatchEulerDiscreteScheduler" for c in type(scheduler).__mro__)
    if guidance.recurrence > 0 and flow and not flow_euler:
        raise ValueError(f"guidance recurrence={guidance.recurrence} needs a scheduler whose step is stateless; "
                         f"{name} keeps multistep state (use FlowMatchEulerDiscreteScheduler)")
    if guidance.recurrence > 0 and not flow and name not in RECURRENT_SCHEDULERS:
        raise ValueError(f"guidance recurrence={guidance.recurrence} needs a scheduler whose step is stateless, "
                         f"one of {list(RECURRENT_SCHEDULERS)}; {name} keeps multistep state")


def _step_kwargs(scheduler: object, eta: float, generator: torch.Generator | None) -> dict[str, object]:
    """``eta`` and ``generator`` for the schedulers whose ``step`` takes them (DDIM, DDPM, Euler ancestral)."""
    params = inspect.signature(scheduler.step).parameters
    return {k: v for k, v in (("eta", eta), ("generator", generator)) if k in params}


def _record_final(result: SampleResult, out: ClassifierOutput, labels: Tensor | None, name: str) -> None:
    """Fill ``result``'s per-sample records ``[B]`` from the classifier's output on the final images.

    ``name`` is the signal to record; a signal that needs heads falls back to entropy on a plain classifier.
    """
    if out.head_logits is None and get_signal(name).needs_heads:
        name = "entropy"
    result.output, result.signal_name = out, name
    result.signal = get_signal(name)(out.logits, out.head_logits).float()
    probs = out.logits.float().softmax(dim=-1)
    result.pred = probs.argmax(dim=-1)
    if labels is not None:
        result.p_class = probs.gather(1, labels.view(-1, 1).to(probs.device)).squeeze(1)


def _alpha_bar_prev(scheduler: object, alphas: Tensor, i: int, t: Tensor) -> Tensor:
    """``alpha_bar`` of the level step ``i`` lands on, as the scheduler's own ``step`` computes it
    (sigma schedulers: ``1 / (1 + sigma_{i+1}^2)``; DDIM: ``final_alpha_cumprod`` past the end; DDPM: 1)."""
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, Tensor) and len(sigmas) == len(scheduler.timesteps) + 1:
        return 1.0 / (1.0 + sigmas[i + 1].to(alphas.device, torch.float32) ** 2)
    if type(scheduler).__name__ == "DDIMScheduler":
        prev = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        return alphas[prev] if prev >= 0 else scheduler.final_alpha_cumprod.to(alphas.device)
    prev = int(scheduler.previous_timestep(t))
    return alphas[prev] if prev >= 0 else torch.ones((), device=alphas.device)


def renoise(z_prev: Tensor, a_t: Tensor, a_prev: Tensor, noise: Tensor, sigma_space: bool = False) -> Tensor:
    """Take a step back up to level ``t`` (Universal Guidance's time travel, FreeDoM's recurrence).

    Variance-preserving form: ``z_t' = sqrt(a_t / a_prev) z_{t-1} + sqrt(1 - a_t / a_prev) noise``, with
    ``a = alpha_bar``; shapes ``[B, ...]``. ``sigma_space``: ``z`` is the Euler variable ``z_vp / sqrt(a)``
    (then ``x_t = x_{t-1} + sqrt(sigma_t^2 - sigma_{t-1}^2) noise``, the same map).
    """
    ratio = (a_t / a_prev).to(z_prev.dtype)
    if sigma_space:
        z_prev = z_prev * a_prev.sqrt().to(z_prev.dtype)
    z_t = ratio.sqrt() * z_prev + (1 - ratio).clamp_min(0).sqrt() * noise.to(z_prev)
    return z_t / a_t.sqrt().to(z_prev.dtype) if sigma_space else z_t


def renoise_flow(x_prev: Tensor, sigma: Tensor, sigma_prev: Tensor, noise: Tensor) -> Tensor:
    """``renoise`` on a rectified-flow path: from level ``sigma_prev`` back up to ``sigma`` (>= it).

    ``x_s = a x_{s'} + b n`` with ``a = (1 - s) / (1 - s')`` and ``b = sqrt(s^2 - a^2 s'^2)``: if
    ``x_{s'} = (1 - s') x0 + s' n'`` then ``x_s = (1 - s) x0`` plus noise of standard deviation ``s``, the
    path's marginal at ``s``. Shapes ``[B, ...]``; ``sigma < 1``.
    """
    a = ((1 - sigma) / (1 - sigma_prev)).to(x_prev.dtype)
    b = (sigma**2 - a**2 * sigma_prev**2).clamp_min(0).sqrt().to(x_prev.dtype)
    return a * x_prev + b * noise.to(x_prev)


def _recurrences(guide: LongtailGuide | None, i: int, level: Tensor) -> int:
    """How many times step ``i`` is redone: ``recurrence`` on guided steps at a nonzero weight, else 0
    (at ``w = 0``, or at a flow step left unguided at sigma = 1, redoing would change the sample without
    guiding it)."""
    if guide is None or guide.config.weight == 0.0 or not guide.guides(i, level):
        return 0
    return guide.config.recurrence


def _rewind(scheduler: object) -> None:
    """Undo ``step``'s only state change in a recurrent scheduler: the step index (Euler keeps one)."""
    if getattr(scheduler, "_step_index", None) is not None:
        scheduler._step_index -= 1


def _cfg_velocity(denoiser: Denoiser, x: Tensor, t: Tensor, cond: Tensor, both: Tensor | None,
                  cfg_scale: float) -> Tensor:
    """Classifier-free guidance on raw model outputs ``v_u + s (v_c - v_u)`` (as diffusers' flow pipelines);
    ``both`` as ``_cfg_eps``."""
    if both is None:
        return denoiser(x, t, cond)
    out_u, out_c = denoiser(torch.cat([x, x]), t, both).chunk(2)
    return out_u + cfg_scale * (out_c - out_u)


def _sampling_scope(denoiser: Denoiser) -> contextlib.AbstractContextManager:
    """The generator's ``sampling_scope()`` when ``denoiser`` is a bound method of one (``LatentDiffusion``:
    text projections reused within the call), else a no-op."""
    scope = getattr(getattr(denoiser, "__self__", None), "sampling_scope", None)
    return scope() if callable(scope) else contextlib.nullcontext()


def _fallback_notes(decode: Callable[[Tensor], Tensor]) -> list[str] | None:
    """The ``decode_fallbacks`` list of the generator ``decode`` is a bound method of (None for others)."""
    notes = getattr(getattr(decode, "__self__", None), "decode_fallbacks", None)
    return notes if isinstance(notes, list) else None


@torch.no_grad()
def sample(
    *,
    denoiser: Denoiser,
    scheduler: object,
    decode: Callable[[Tensor], Tensor],
    cond: Tensor,
    latents: Tensor,
    uncond: Tensor | None = None,
    num_steps: int = 50,
    cfg_scale: float = 1.0,
    eta: float = 0.0,
    classifier: Callable[[Tensor], Tensor | ClassifierOutput] | None = None,
    labels: Tensor | None = None,
    guidance: GuidanceConfig | None = None,
    record_signal: str | None = None,
    generator: torch.Generator | None = None,
    on_step: StepCallback | None = None,
    guide_decode: Callable[[Tensor], Tensor] | None = None,
    encode: Callable[[Tensor], Tensor] | None = None,
    timestep_kwargs: Mapping[str, object] | None = None,
) -> SampleResult:
    """Run the (optionally longtail-guided) sampler from ``latents`` = z_T ``[B, ...]`` (Algorithm 1).

    ``cond``/``uncond [B, ...]``: conditioning batches for the denoiser (``uncond`` enables CFG with
    ``cfg_scale``). ``guidance=None`` is the plain sampler; with a ``GuidanceConfig`` a ``LongtailGuide``
    biases eps on its window's steps (Eq. 11) before each scheduler step (Eq. 7); ``guide_decode`` replaces
    ``decode`` on the guidance path only; ``encode(image) -> latent`` (inverting ``decode``) is needed by
    ``guidance.project`` (MPGD). With ``guidance.recurrence = r`` (and a nonzero weight) each guided step is
    redone r times after re-noising its result back to its level with ``renoise`` (Universal Guidance,
    FreeDoM); ``result.denoiser_calls`` / ``recurrence_calls`` count the cost. ``labels [B]`` (intended
    classes) give P(class) records; ``record_signal`` names the signal recorded on the final images
    (default: the guidance signal, else entropy). ``on_step(info)`` is called once per step (after its last
    recurrence pass) with a dict: ``step`` (index), ``timestep``, ``z`` (the variance-preserving latent
    ``[B, ...]``), ``eps`` (unguided), ``a_t`` (alpha_bar), ``z0`` (Eq. 8 from the unguided eps) and
    ``guided`` (the eps the scheduler steps with).

    Flow matching (a scheduler in ``FLOW_SCHEDULERS``): the denoiser's output is a velocity; CFG mixes
    velocities, guidance uses ``guided_velocity`` (``LongtailGuide(flow=True)``), and ``on_step``'s dict has
    ``z`` (= x_s), ``v``, ``sigma``, ``z0`` (``predicted_x0_flow``) and ``guided`` (the velocity stepped
    with). ``timestep_kwargs`` go to ``scheduler.set_timesteps`` (``mu`` for dynamic shifting, ``sigmas``).
    Recurrence re-noises with ``renoise_flow``.

    ``decode`` that is a bound method of a generator with a ``decode_fallbacks`` list (``LatentDiffusion``:
    it upcasts a half-precision VAE whose decode is non-finite) has the notes made during this call copied to
    ``result.fallbacks``; ``result.nonfinite_images`` counts final images that are still not finite.

    A classifier that is an ``nn.Module`` is put in eval mode with frozen parameters for the call (restored
    after). Raises ``ValueError`` for an unsupported scheduler, ``num_steps`` outside ``1 ..
    num_train_timesteps - 1`` (``check_num_steps``), mismatched batches, guidance without a
    classifier, a bad guidance option (naming it), ``project`` without ``encode``, ``recurrence`` with a
    multistep scheduler (not in ``RECURRENT_SCHEDULERS``, nor flow Euler), or a dynamically shifted
    flow scheduler without ``timestep_kwargs["mu"]``.
    """
    _check_inputs(scheduler, cond, latents, guidance, classifier, encode, num_steps, timestep_kwargs)
    started = time.perf_counter()
    flow = is_flow_scheduler(scheduler)
    scheduler.set_timesteps(num_steps, device=latents.device, **dict(timestep_kwargs or {}))
    prediction = scheduler.config.get("prediction_type", "epsilon")
    step_kwargs = _step_kwargs(scheduler, eta, generator)
    alphas = None if flow else scheduler.alphas_cumprod.to(latents.device)
    sigma_space = type(scheduler).__name__ in SIGMA_SPACE_SCHEDULERS
    notes = _fallback_notes(decode)
    first_note = len(notes) if notes is not None else 0
    both = cfg_text(cond, uncond, cfg_scale)

    def one_pass(i: int, t: Tensor, z: Tensor, level: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One denoiser call, guidance and scheduler step from ``z``: (model-space z, unguided prediction,
        guided prediction, next z); the prediction is eps (``level`` = a_t) or, for flow, v (``level`` = sigma)."""
        track = guide is not None and guide.needs_denoiser_graph(i)  # one pass serves eps and the gradient
        z_in = z if flow else scheduler.scale_model_input(z, t)  # z itself for DDIM and flow
        z_in = z_in.detach().requires_grad_(track)
        with torch.set_grad_enabled(track):
            pred = (_cfg_velocity(denoiser, z_in, t, cond, both, cfg_scale) if flow else
                    _cfg_eps(denoiser, z_in, t, cond, both, cfg_scale, level, prediction))
        guided = pred if guide is None else guide(i, z_in, level, pred, timestep=t, repeat=r)
        z_in, pred = z_in.detach(), pred.detach()
        output = guided if flow else model_output_from_eps(guided, z_in, level, prediction)
        return z_in, pred, guided, scheduler.step(output, t, z, **step_kwargs).prev_sample

    with frozen(classifier), _sampling_scope(denoiser):
        guide = None if guidance is None else LongtailGuide(
            guidance, classifier, decode, num_steps=len(scheduler.timesteps), guide_decode=guide_decode,
            encode=encode, flow=flow)
        z, calls, extra = latents * getattr(scheduler, "init_noise_sigma", 1.0), 0, 0
        for i, t in enumerate(scheduler.timesteps):
            level = (scheduler.sigmas[i] if flow else _alpha_bar(scheduler, alphas, i, t)).to(z.dtype)
            repeats = _recurrences(guide, i, level)
            z_in, pred, guided, z_next = one_pass(i, t, z, level, 0)
            for r in range(1, repeats + 1):  # time travel: back up to level t, redo the guided step
                _rewind(scheduler)
                noise = torch.randn(z.shape, generator=option_generator(guidance.seed, i, r, stream=1))
                z_back = (renoise_flow(z_next, level, scheduler.sigmas[i + 1].to(level), noise) if flow else
                          renoise(z_next, level, _alpha_bar_prev(scheduler, alphas, i, t), noise, sigma_space))
                z_in, pred, guided, z_next = one_pass(i, t, z_back, level, r)
            calls, extra, z = calls + 1 + repeats, extra + repeats, z_next
            if on_step is not None:
                on_step(_step_info(flow, i, t, z_in, pred, level, guided))
        result = SampleResult(images=decode(z), latents=z, denoiser_calls=calls, recurrence_calls=extra)
        result.nonfinite_images = int((~torch.isfinite(result.images).flatten(1).all(dim=1)).sum())
        result.fallbacks = list(notes[first_note:]) if notes is not None else []
        if guide is not None:
            result.trajectory, result.nonfinite = guide.records, guide.nonfinite
        if classifier is not None:
            name = record_signal or (guidance.signal if guidance is not None else "entropy")
            _record_final(result, as_output(classifier(result.images)), labels, name)
    result.seconds = time.perf_counter() - started
    return result


def _step_info(flow: bool, i: int, t: Tensor, z: Tensor, pred: Tensor, level: Tensor, guided: Tensor
               ) -> dict[str, Any]:
    """``on_step``'s dict (see ``sample``): eps / a_t keys for diffusion, v / sigma keys for flow matching."""
    if flow:
        return {"step": i, "timestep": t, "z": z, "v": pred, "sigma": level,
                "z0": predicted_x0_flow(z, pred, level), "guided": guided}
    return {"step": i, "timestep": t, "z": z, "eps": pred, "a_t": level, "z0": predicted_z0(z, pred, level),
            "guided": guided}
