"""The cost of one longtail-guided sampler step at SD 1.5, SDXL and FLUX scale: FLOPs, time, memory, levers.

    python benchmarks/sd_cost.py --size sd15 --json-out sd15.json           # GPU: every part, variant, lever
    python benchmarks/sd_cost.py --size flux --count-only                     # FLOPs only (meta device, any host)
    python benchmarks/sd_cost.py --size tiny --device cpu                     # the same code at test size
    python benchmarks/sd_cost.py --sampling [...]   # whole guided vs unguided sampling runs (sd_cost_sampling.py)

Random-weight models with the public checkpoints' architectures (``sd_cost_models.py``): their FLOPs, times and
memory are the real models', their signal values are not. One guided step is: the denoiser forward on the CFG
batch (2B latents; B for guidance-distilled FLUX), the predicted clean latent, the VAE decoder forward, the
classifier forward (ResNet-50 + 5-head Epistemic Head behind its preprocessing), the classifier backward and the
decoder backward (input gradients only: both are frozen), then Eq. 11. The SD families use the package's
``make_score_fn`` / ``longtail_grad`` / ``guided_eps`` (``longtail.guidance``) for that step; FLUX, which the
package does not sample yet, uses the same functions on the flow-matching clean estimate ``x0 = x_t - sigma v``.

Printed (and written with ``--json-out``), every number measured in this run:

1. FLOPs per part, counted by ``torch.utils.flop_counter.FlopCounterMode`` on meta-device copies of the models
   (exact counts for matmuls, convolutions and attention; element-wise ops are not counted), the time per part
   (CUDA events; ``perf_counter`` on a CPU) and achieved TFLOP/s and share of the device's dense peak.
2. Variants: unguided vs guided step time and peak memory, with and without decoder checkpointing
   (``longtail.models.ldm.set_decoder_checkpointing``) and with ``AutoencoderTiny`` on the guidance path.
3. Levers, each a setting, each measured against the baseline in this run: ``--compile``, ``--channels-last``,
   ``--sdpa-vae``, ``--bf16-backward``, ``--cuda-graphs``, ``--max-batch``, and all of them together.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sd_cost_models import SIZES, Models, SizeSpec, build_models, conditioning

from longtail.guidance import guided_eps, longtail_grad, make_score_fn, predicted_z0
from longtail.models.ldm import ddim_scheduler, set_decoder_checkpointing
from longtail.models.stable_diffusion import resolve_dtype
from longtail.models.surrogate import surrogate_decode
from longtail.outputs import ClassifierOutput
from longtail.signals import get_signal

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets; "fp32" is the non-tensor FP32 rate.
# Matched by substring of torch.cuda.get_device_name, first match wins (so the H100 variants come before "H100").
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"fp16": 989.4, "bf16": 989.4, "fp32": 66.9},
    "H100 PCIe": {"fp16": 756.0, "bf16": 756.0, "fp32": 51.2},
    "H100 NVL": {"fp16": 835.0, "bf16": 835.0, "fp32": 60.0},
    "H100": {"fp16": 989.4, "bf16": 989.4, "fp32": 66.9},  # SXM
    "A100": {"fp16": 312.0, "bf16": 312.0, "fp32": 19.5},
    "L40S": {"fp16": 362.1, "bf16": 362.1, "fp32": 91.6},
    "L4": {"fp16": 121.0, "bf16": 121.0, "fp32": 30.3},
}
PARTS = ("denoiser", "decoder_fwd", "classifier_fwd", "classifier_bwd", "decoder_bwd")
PART_LABELS = {"denoiser": "denoiser fwd (CFG batch)", "decoder_fwd": "decoder fwd", "decoder_bwd": "decoder bwd",
               "classifier_fwd": "classifier fwd", "classifier_bwd": "classifier bwd"}
# torch.compile settings (--compile), chosen rather than defaulted:
# * mode "default": Inductor's fusions without CUDA graphs and without autotuning. CUDA graphs are their own lever
#   (--cuda-graphs), so "reduce-overhead" would measure two levers at once; "max-autotune" benchmarks GEMM / conv
#   templates per shape, minutes per model at these sizes, which a 15-minute device session cannot afford, and
#   the decoder's time is in cuDNN convolutions that the default mode already calls.
# * dynamic=False: within a run the batch and resolution are fixed, so static shapes give specialised kernels and
#   never recompile; symbolic shapes would only pay off for a batch that changes (--max-batch runs eagerly).
COMPILE_MODE, COMPILE_DYNAMIC = "default", False


@dataclass(frozen=True)
class StepPoint:
    """Where the measured step sits: DDIM timestep and its ``alpha_bar`` (SD families), ``sigma`` (FLUX)."""

    timestep: int = 500
    a_t: float = 0.0
    sigma: float = 0.5


def step_point(spec: SizeSpec) -> StepPoint:
    """The middle of the schedule: timestep 500 of SD's scaled-linear betas, sigma 0.5 for flow matching."""
    return StepPoint(500, float(ddim_scheduler().alphas_cumprod[500]), 0.5)


# --- the parts of a step ---------------------------------------------------------------------------------------


def pack(z: Tensor) -> Tensor:
    """FLUX latents ``[B, C, H, W]`` -> 2x2 patch tokens ``[B, H/2 * W/2, 4C]`` (diffusers' ``_pack_latents``)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """Inverse of ``pack``: ``[B, H/2 * W/2, 4C]`` -> ``[B, C, H, W]``."""
    c, h, w = shape
    b = tokens.shape[0]
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def denoise(m: Models, z: Tensor, point: StepPoint, cond: dict[str, Tensor], cfg: float = 7.5) -> Tensor:
    """Noise estimate ``[B, c, h, w]`` with classifier-free guidance (one denoiser call on ``[z, z]``), or FLUX's
    velocity ``[B, c, h, w]`` (one call; the guidance scale is an input of the distilled model)."""
    b = z.shape[0]
    if m.spec.family == "flux":
        v = m.denoiser(hidden_states=pack(z), encoder_hidden_states=cond["text"], pooled_projections=cond["pooled"],
                       timestep=torch.full((b,), point.sigma, device=z.device, dtype=z.dtype),
                       img_ids=cond["img_ids"], txt_ids=cond["txt_ids"], guidance=cond["guidance"]).sample
        return unpack(v, tuple(z.shape[1:]))
    added = ({"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]} if m.spec.family == "sdxl" else None)
    t = torch.full((2 * b,), point.timestep, device=z.device)
    out = m.denoiser(torch.cat([z, z]), t, encoder_hidden_states=cond["text"], added_cond_kwargs=added).sample
    eps_u, eps_c = out.chunk(2)
    return eps_u + cfg * (eps_c - eps_u)


def clean_estimate(m: Models, z: Tensor, eps: Tensor, point: StepPoint) -> Tensor:
    """Predicted clean latent: Eq. 8 (``predicted_z0``) for the SD families, ``x_t - sigma v`` for flow matching."""
    if m.spec.family == "flux":
        return z - point.sigma * eps
    return predicted_z0(z, eps, point.a_t)


class LatentDecoder(nn.Module):
    """Sampler latents ``[B, c, h, w]`` -> images ``[B, 3, H, W]``: ``vae.decode(z / scaling + shift)``."""

    def __init__(self, vae: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.vae, self.channels_last = vae, channels_last
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def forward(self, z: Tensor) -> Tensor:
        z = (z / self.scaling + self.shift).to(next(self.vae.parameters()).dtype)
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        return self.vae.decode(z).sample


class ClassifyTensors(nn.Module):
    """A ``BridgedClassifier`` returning ``(logits [B, C], head_logits [B, K, C])``: plain tensors, as CUDA graph
    capture needs; ``as_output`` below rebuilds the ``ClassifierOutput``."""

    def __init__(self, classifier: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.classifier, self.channels_last = classifier, channels_last

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.classifier(x)
        return out.logits, out.head_logits


@dataclass
class GuidePath:
    """The guidance path of one setting: ``decode`` (latents -> images), ``classify`` (images -> tensors), the
    dtype it runs in, and an optional fp32 ``fallback`` path for samples whose gradient is non-finite."""

    name: str
    decode: Callable[[Tensor], Tensor]
    classify: Callable[[Tensor], tuple[Tensor, Tensor]]
    dtype: torch.dtype
    fallback: GuidePath | None = None
    batch: int | None = None  # fixed batch (CUDA graphs), None: any
    notes: list[str] = field(default_factory=list)

    def output(self, images: Tensor) -> ClassifierOutput:
        logits, heads = self.classify(images)
        return ClassifierOutput(logits=logits, head_logits=heads)


def plain_path(m: Models, name: str = "baseline", decoder: nn.Module | None = None) -> GuidePath:
    """The eager guidance path on the models as built (``decoder``: another latent decoder, e.g. the tiny one)."""
    dtype = next(m.vae.parameters()).dtype
    return GuidePath(name, decoder or LatentDecoder(m.vae), ClassifyTensors(m.classifier), dtype)


def guidance_grad(m: Models, path: GuidePath, z: Tensor, eps: Tensor, point: StepPoint,
                  signal: str) -> tuple[Tensor, int, int]:
    """d signal / d z_t ``[B, c, h, w]`` through ``path`` (``longtail_grad``: non-finite samples zeroed), with
    the samples that came out non-finite recomputed on ``path.fallback`` when it has one.

    Returns (gradient, samples still non-finite, samples recomputed on the fallback)."""
    lg = _grad(m, path, z, eps, point, signal)
    grad, bad = lg.grad, ~lg.finite
    nonfinite, fallbacks = int(bad.sum()), 0
    if nonfinite and path.fallback is not None:
        idx = bad.nonzero().flatten()
        redo = _grad(m, path.fallback, z[idx], eps[idx], point, signal)
        grad = grad.clone()
        grad[idx] = redo.grad.to(grad.dtype)
        nonfinite, fallbacks = int((~redo.finite).sum()), len(idx)
    return grad, nonfinite, fallbacks


def _grad(m: Models, path: GuidePath, z: Tensor, eps: Tensor, point: StepPoint, signal: str):
    score = make_score_fn(path.decode, path.output, signal)
    if m.spec.family == "flux":  # d/dz of signal(decode(z - sigma v)) with v detached: on_noisy scores z itself
        v = eps.detach()
        return longtail_grad(z, point.sigma, lambda x: score(x - point.sigma * v), eps=v, on_noisy=True)
    return longtail_grad(z, point.a_t, score, eps=eps)


def guided_step(m: Models, path: GuidePath | None, z: Tensor, point: StepPoint, cond: dict[str, Tensor],
                signal: str, weight: float) -> tuple[Tensor, int, int]:
    """One sampler step's noise estimate (``path=None``: unguided). SD families: Eq. 11 (``guided_eps``);
    FLUX: ``v - w g``, so that the Euler step ``x - dt v`` climbs the signal (the flow-matching rule itself
    is an element-wise op, free next to the parts timed here). Returns (estimate, non-finite, fallbacks)."""
    with torch.no_grad():
        eps = denoise(m, z, point, cond)
    if path is None:
        return eps, 0, 0
    grad, nonfinite, fallbacks = guidance_grad(m, path, z, eps, point, signal)
    if m.spec.family == "flux":
        return eps - weight * grad.to(eps.dtype), nonfinite, fallbacks
    return guided_eps(eps, grad, point.a_t, weight), nonfinite, fallbacks


def step_parts(m: Models, path: GuidePath, z: Tensor, point: StepPoint, cond: dict[str, Tensor],
               signal: str) -> Iterator[str]:
    """The guided step split into its parts, yielding each part's name (``PARTS``) right after it ran.

    The decoder and classifier are separated by a detach, so each backward is its own call:
    ``autograd.grad(score, image)`` then ``autograd.grad(image, z0, d score / d image)``; the total is the
    same computation as ``guidance_grad``'s single backward."""
    sig = get_signal(signal)
    with torch.no_grad():
        eps = denoise(m, z, point, cond)
    yield "denoiser"
    with torch.enable_grad():
        z0 = clean_estimate(m, z, eps, point).detach().requires_grad_(True)
        images = path.decode(z0)
        yield "decoder_fwd"
        x = images.detach().requires_grad_(True)
        out = path.output(x)
        score = sig(out.logits, out.head_logits)
        yield "classifier_fwd"
        (d_image,) = torch.autograd.grad(score.float().sum(), x)
        yield "classifier_bwd"
        torch.autograd.grad(images, z0, d_image.to(images.dtype))
        yield "decoder_bwd"


# --- measuring -------------------------------------------------------------------------------------------------


class Clock:
    """Marks on one timeline: CUDA events on a GPU (no host sync until ``read``), ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []
        self.mark("start")

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def read(self) -> dict[str, float]:
        """Seconds from each mark to the next, keyed by the later mark's name."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:], strict=False):
            out[name] = a.elapsed_time(b) / 1e3 if self.cuda else b - a
        return out


def count_flops(parts: Iterator[str]) -> dict[str, int]:
    """FLOPs of each part of a ``step_parts`` generator (``FlopCounterMode`` around each resumption)."""
    counts: dict[str, int] = {}
    while True:
        counter = FlopCounterMode(display=False)
        with counter:
            try:
                name = next(parts)
            except StopIteration:
                return counts
        counts[name] = int(counter.get_total_flops())


def latents(spec: SizeSpec, batch: int, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> Tensor:
    """Seeded z_t ``[B, c, h, w]`` (N(0, 1): a noisy latent's scale)."""
    z = torch.randn((batch, *spec.latent_shape), generator=torch.Generator().manual_seed(seed))
    return z.to(device=device, dtype=dtype)


def flop_table(spec: SizeSpec, batch: int, signal: str) -> dict[str, object]:
    """FLOPs of every part at ``batch``, counted on meta-device models (no memory, no time): the baseline, the
    decoder backward with checkpointing (it recomputes the forward) and the tiny decoder's forward / backward."""
    meta = build_models(spec, "meta", torch.float32, batch)
    point, cond = step_point(spec), meta.cond
    z = latents(spec, batch, "meta", torch.float32)
    base = count_flops(step_parts(meta, plain_path(meta), z, point, cond, signal))
    set_decoder_checkpointing(meta.vae, True)
    ckpt = count_flops(step_parts(meta, plain_path(meta), z, point, cond, signal))
    set_decoder_checkpointing(meta.vae, False)
    tiny = count_flops(step_parts(meta, plain_path(meta, decoder=surrogate_decode(meta.tiny)), z, point, cond, signal))
    return {"batch": batch, "parts": base, "decoder_bwd_checkpointed": ckpt["decoder_bwd"],
            "tiny_decoder_fwd": tiny["decoder_fwd"], "tiny_decoder_bwd": tiny["decoder_bwd"],
            "params": {"denoiser": sum(p.numel() for p in meta.denoiser.parameters()),
                       "vae_decoder": sum(p.numel() for p in meta.vae.decoder.parameters()),
                       "tiny_decoder": sum(p.numel() for p in meta.tiny.decoder.parameters()),
                       "classifier": sum(p.numel() for p in meta.classifier.parameters())}}


def time_parts(m: Models, path: GuidePath, batch: int, point: StepPoint, signal: str, reps: int,
               warmup: int) -> dict[str, float]:
    """Median seconds of each part over ``reps`` runs after ``warmup`` runs."""
    z, cond = latents(m.spec, batch, m.device, dtype_of(m)), cond_for(m, batch)
    runs: list[dict[str, float]] = []
    for i in range(warmup + reps):
        clock = Clock(m.device)
        for name in step_parts(m, path, z, point, cond, signal):
            clock.mark(name)
        if i >= warmup:
            runs.append(clock.read())
    return {k: statistics.median(r[k] for r in runs) for k in PARTS}


def time_step(m: Models, path: GuidePath | None, batch: int, point: StepPoint, signal: str, weight: float,
              reps: int, warmup: int) -> dict[str, float]:
    """Median seconds of one whole step (``guided_step``; ``path=None``: unguided), peak and resident memory."""
    z, cond = latents(m.spec, batch, m.device, dtype_of(m)), cond_for(m, batch)
    cuda = m.device.type == "cuda"
    times, nonfinite, fallbacks = [], 0, 0
    if cuda:
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + reps):
        clock = Clock(m.device)
        _, nf, fb = guided_step(m, path, z, point, cond, signal, weight)
        clock.mark("step")
        if i >= warmup:
            times.append(clock.read()["step"])
            nonfinite, fallbacks = nonfinite + nf, fallbacks + fb
    out = {"seconds": statistics.median(times), "batch": batch, "nonfinite": nonfinite, "fallbacks": fallbacks,
           "peak_mib": None, "extra_mib": None}
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        out.update(peak_mib=peak / 2**20, extra_mib=(peak - resident) / 2**20)
    return out


def dtype_of(m: Models) -> torch.dtype:
    return next(m.denoiser.parameters()).dtype


_COND_CACHE: dict[tuple[int, int], dict[str, Tensor]] = {}


def cond_for(m: Models, batch: int) -> dict[str, Tensor]:
    """The denoiser's conditioning for ``batch`` latents (built once per batch)."""
    if batch == m.batch:
        return m.cond
    key = (id(m), batch)
    if key not in _COND_CACHE:
        _COND_CACHE.clear()
        _COND_CACHE[key] = conditioning(m.spec, batch, m.device, dtype_of(m))
    return _COND_CACHE[key]


def peak_tflops(device: torch.device, dtype: torch.dtype, override: float | None) -> float | None:
    """The device's dense peak for ``dtype`` (TFLOP/s): ``override``, else ``PEAK_TFLOPS`` by device name;
    None on a CPU or an unlisted GPU."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    for pattern, peaks in PEAK_TFLOPS.items():
        if pattern in name:
            return peaks[key]
    return None


# --- levers ----------------------------------------------------------------------------------------------------


def attention_processor_name(vae: nn.Module) -> str:
    """The class name of the VAE mid-block attention's processor (what diffusers chose by default)."""
    return type(vae.decoder.mid_block.attentions[0].processor).__name__


def lever_path(m: Models, name: str, *, compile: bool = False, channels_last: bool = False,
               classic_attention: bool = False, bf16: bool = False, cuda_graphs: bool = False,
               batch: int | None = None) -> GuidePath:
    """A guidance path with the given levers, on copies of the decoder and classifier (the models stay as built).

    ``bf16``: the decoder and classifier run (forward and backward) in bfloat16, with fp32 copies as the
    fallback for non-finite samples. ``classic_attention``: the VAE's attention through diffusers'
    ``AttnProcessor`` (explicit softmax(QK^T) V) instead of its default. ``cuda_graphs``: forward and
    backward of decoder and classifier captured with ``torch.cuda.make_graphed_callables`` at ``batch``.
    """
    from diffusers.models.attention_processor import AttnProcessor

    dtype = torch.bfloat16 if bf16 else next(m.vae.parameters()).dtype
    vae = copy.deepcopy(m.vae).to(dtype=dtype)
    classifier = copy.deepcopy(m.classifier).to(dtype=dtype)
    if classic_attention:
        vae.set_attn_processor(AttnProcessor())
    if channels_last:
        vae, classifier = vae.to(memory_format=torch.channels_last), classifier.to(memory_format=torch.channels_last)
    decode: nn.Module = LatentDecoder(vae, channels_last)
    classify: nn.Module = ClassifyTensors(classifier, channels_last)
    notes = []
    if compile:
        decode = torch.compile(decode, mode=COMPILE_MODE, dynamic=COMPILE_DYNAMIC)
        classify = torch.compile(classify, mode=COMPILE_MODE, dynamic=COMPILE_DYNAMIC)
        notes.append(f"torch.compile mode={COMPILE_MODE} dynamic={COMPILE_DYNAMIC}")
    fallback = None
    if bf16:
        fallback = GuidePath("fp32 fallback", LatentDecoder(copy.deepcopy(m.vae).float()),
                             ClassifyTensors(copy.deepcopy(m.classifier).float()), torch.float32)
    path = GuidePath(name, decode, classify, dtype, fallback=fallback, notes=notes)
    if cuda_graphs:
        path = graphed(m, path, batch or m.batch)
    return path


def graphed(m: Models, path: GuidePath, batch: int) -> GuidePath:
    """``path`` with its decoder and classifier captured as CUDA graphs (forward and backward each) at ``batch``:
    replays skip the per-kernel launch cost; shapes are then fixed (``path.batch``)."""
    dtype = dtype_of(m)
    z0 = latents(m.spec, batch, m.device, dtype).requires_grad_(True)
    decode = torch.cuda.make_graphed_callables(path.decode, (z0,))
    images = torch.randn((batch, 3, m.spec.image, m.spec.image), device=m.device, dtype=path.dtype)
    classify = torch.cuda.make_graphed_callables(path.classify, (images.requires_grad_(True),))
    return replace(path, decode=decode, classify=classify, batch=batch, notes=[*path.notes, f"CUDA graphs at batch {batch}"])


# Errors that mean "this batch does not run on this device": out of memory, cuDNN failing to allocate its
# workspace at the edge, and kernels refusing tensors past 2**31 elements (large decoder activations).
NO_FIT = ("out of memory", "cudnn_status_alloc_failed", "cudnn_status_not_supported", "int_max",
          "32-bit index", "canuse32bitindexmath")


def no_fit_reason(err: BaseException) -> str | None:
    """Why a batch did not run (``err``'s first line) when the error is one of ``NO_FIT``; None otherwise."""
    text = str(err).lower()
    if isinstance(err, torch.cuda.OutOfMemoryError) or any(k in text for k in NO_FIT):
        return f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return None


def fits(m: Models, batch: int, point: StepPoint, signal: str, weight: float) -> str | None:
    """Run one guided step (eager baseline path) at ``batch``: None when it ran, else why it did not
    (``no_fit_reason``). Other errors propagate."""
    try:
        guided_step(m, plain_path(m), latents(m.spec, batch, m.device, dtype_of(m)), point,
                    cond_for(m, batch), signal, weight)
        torch.cuda.synchronize()
        return None
    except Exception as err:
        reason = no_fit_reason(err)
        if reason is None:
            raise
        return reason
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def max_batch(m: Models, point: StepPoint, signal: str, weight: float, cap: int) -> tuple[int, list[int], str]:
    """The largest batch whose guided step runs: double from 1 until a batch does not (or past ``cap``), then
    bisect between the last that ran and the first that did not. Returns (batch, batches tried in order, why
    the smallest failing batch failed; "" when ``cap`` ran)."""
    tried, good, bad, why = [], 0, None, ""
    b = 1
    while b <= cap:
        tried.append(b)
        reason = fits(m, b, point, signal, weight)
        if reason is not None:
            bad, why = b, reason
            break
        good, b = b, b * 2
    if bad is None:
        return good, tried, why
    while bad - good > 1:
        mid = (good + bad) // 2
        tried.append(mid)
        reason = fits(m, mid, point, signal, weight)
        if reason is None:
            good = mid
        else:
            bad, why = mid, reason
    return good, tried, why


# --- the run ---------------------------------------------------------------------------------------------------


def per_image_ms(seconds: float, batch: int) -> float:
    return 1e3 * seconds / batch


def parts_row(parts: dict[str, float], flops: dict[str, int] | None, batch: int, peak: float | None) -> dict:
    """Per part: ms per image, and with FLOPs TFLOP/s achieved and share of ``peak``."""
    row = {}
    for k in PARTS:
        entry = {"ms_per_image": per_image_ms(parts[k], batch)}
        if flops is not None and parts[k] > 0:
            tflops = flops[k] / parts[k] / 1e12
            entry.update(tflops=tflops, peak_share=None if peak is None else tflops / peak)
        row[k] = entry
    return row


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_flops(table: dict, parts: dict | None, spec: SizeSpec, peak: float | None) -> None:
    b = table["batch"]
    print(f"FLOPs per image (FlopCounterMode, meta device, batch {b}; {spec.note})")
    print(f"{'part':<30}{'GFLOP/img':>12}{'ms/img':>10}{'TFLOP/s':>10}{'% peak':>9}")
    total = 0
    labels = dict(PART_LABELS, denoiser="denoiser fwd (CFG batch 2B)" if spec.cfg_batch == 2
                  else "denoiser fwd (B: distilled CFG)")
    for k in PARTS:
        gflop = table["parts"][k] / b / 1e9
        total += table["parts"][k]
        p = (parts or {}).get(k, {})
        share = p.get("peak_share")
        print(f"{labels[k]:<30}{gflop:>12.{1 if gflop >= 10 else 3}f}{fmt(p.get('ms_per_image'), '.2f'):>10}"
              f"{fmt(p.get('tflops'), '.1f'):>10}{fmt(None if share is None else 100 * share, '.1f'):>9}")
    print(f"{'guided step, total':<30}{total / b / 1e9:>12.1f}")
    for key, label in (("decoder_bwd_checkpointed", "decoder bwd, checkpointed"),
                       ("tiny_decoder_fwd", "tiny decoder fwd"), ("tiny_decoder_bwd", "tiny decoder bwd")):
        gflop = table[key] / b / 1e9
        print(f"{label:<30}{gflop:>12.{1 if gflop >= 10 else 3}f}")
    fwd, bwd = table["parts"]["decoder_fwd"], table["parts"]["decoder_bwd"]
    print(f"decoder bwd / fwd: {bwd / fwd:.2f} (frozen weights: input gradients only), "
          f"checkpointed {table['decoder_bwd_checkpointed'] / fwd:.2f} (forward recomputed)")


def print_header(title: str) -> None:
    print(title)
    print(f"{'setting':<34}{'dec fwd':>9}{'dec bwd':>9}{'cls f+b':>9}{'step':>9}{'vs ungd':>9}{'dec bwd':>9}"
          f"{'peak MiB':>10}{'non-fin':>8}{'fallbk':>7}  (ms per image; dec bwd: % of peak)", flush=True)


def print_row(r: dict, reference: float) -> None:
    """One measured setting: per-part ms per image, step ms per image, ratio to ``reference`` (unguided ms per
    image at the baseline batch; the max-batch row uses unguided at its own batch), share of peak, memory."""
    if "error" in r:
        print(f"{r['name']:<34} {r['error']}", flush=True)
        return
    p = r.get("parts") or {}
    cls = (p["classifier_fwd"]["ms_per_image"] + p["classifier_bwd"]["ms_per_image"]) if p else None
    share = p.get("decoder_bwd", {}).get("peak_share") if p else None
    step = r["step"]
    ms = per_image_ms(step["seconds"], step["batch"])
    ratio = r.get("vs_unguided_same_batch") or ms / reference
    print(f"{r['name']:<34}{fmt(p.get('decoder_fwd', {}).get('ms_per_image'), '.2f'):>9}"
          f"{fmt(p.get('decoder_bwd', {}).get('ms_per_image'), '.2f'):>9}{fmt(cls, '.2f'):>9}{ms:>9.2f}"
          f"{ratio:>8.2f}x{fmt(None if share is None else 100 * share, '.1f'):>9}"
          f"{fmt(step['peak_mib'], '.0f'):>10}{step['nonfinite']:>8}{step['fallbacks']:>7}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="sd15")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="fp16 | bf16 | fp32 (default: the size's on a GPU, fp32 on a CPU)")
    ap.add_argument("--batch", type=int, default=None, help="latents per step (default: the size's)")
    ap.add_argument("--signal", default="total")
    ap.add_argument("--weight", type=float, default=10.0)
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5 on a GPU, 2 on a CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first runs (default 2 on a GPU, 1 on a CPU)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak (default: table)")
    ap.add_argument("--count-only", action="store_true", help="FLOPs only (meta device): no models in memory")
    ap.add_argument("--no-variants", action="store_true", help="skip the checkpointing / tiny decoder variants")
    ap.add_argument("--compile", action="store_true", help="lever: torch.compile the decoder and classifier")
    ap.add_argument("--channels-last", action="store_true", help="lever: channels-last decoder and classifier")
    ap.add_argument("--sdpa-vae", action="store_true", help="lever: VAE attention with vs without SDPA")
    ap.add_argument("--bf16-backward", action="store_true", help="lever: bf16 guidance path, fp32 fallback")
    ap.add_argument("--cuda-graphs", action="store_true", help="lever: CUDA graphs (GPU only)")
    ap.add_argument("--max-batch", action="store_true", help="lever: the largest batch that fits (GPU only)")
    ap.add_argument("--max-batch-cap", type=int, default=256)
    ap.add_argument("--all-levers", action="store_true", help="every lever, and all of them combined")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    if args.all_levers:
        for k in ("compile", "channels_last", "sdpa_vae", "bf16_backward", "cuda_graphs", "max_batch"):
            setattr(args, k, True)
    return args


def run_lever(m: Models, name: str, build: Callable[[], GuidePath], batch: int, ctx: dict) -> dict:
    """Build a lever's path, time its parts and whole step; a failing lever is reported, not fatal."""
    try:
        path = build()
        parts = time_parts(m, path, batch, ctx["point"], ctx["signal"], ctx["reps"], ctx["warmup"])
        step = time_step(m, path, batch, ctx["point"], ctx["signal"], ctx["weight"], ctx["reps"], ctx["warmup"])
    except Exception as err:  # a benchmark reports a failing setting and goes on
        if m.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
        return {"name": name, "error": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    peak = peak_tflops(m.device, path.dtype, ctx["peak_override"])
    flops = {k: v * batch // ctx["flops"]["batch"] for k, v in ctx["flops"]["parts"].items()}
    return {"name": name, "parts": parts_row(parts, flops, batch, peak), "step": step, "notes": path.notes}


def max_batch_row(m: Models, args: argparse.Namespace, ctx: dict) -> dict:
    """The max-batch lever: search (``max_batch``), count the FLOPs at that batch, time guided and unguided
    there. Measured one eighth lower when the timing itself runs out of memory (fragmentation at the edge)."""
    best, tried, why = max_batch(m, ctx["point"], args.signal, args.weight, args.max_batch_cap)
    search = {"batch": best, "tried": tried, "first_failure": why}
    for b in dict.fromkeys((best, max(1, best - best // 8))):
        row = run_lever(m, f"max batch ({b})", lambda b=b: plain_path(m, f"max batch {b}"), b,
                        dict(ctx, flops=flop_table(m.spec, b, args.signal)))
        if "step" in row:
            row["unguided"] = time_step(m, None, b, ctx["point"], args.signal, args.weight, ctx["reps"], ctx["warmup"])
            row["vs_unguided_same_batch"] = row["step"]["seconds"] / row["unguided"]["seconds"]
            break
    row["search"] = search
    return row


def goals(levers: list[dict], reference_ms: float) -> dict:
    """The issue's two targets over the measured rows: guided / unguided step time <= 3 (same batch) and the
    decoder backward >= 40% of the dense peak; the best row for each."""
    ratios, shares = {}, {}
    for r in levers:
        if "step" not in r:
            continue
        ratios[r["name"]] = r.get("vs_unguided_same_batch") or (
            per_image_ms(r["step"]["seconds"], r["step"]["batch"]) / reference_ms)
        share = (r.get("parts") or {}).get("decoder_bwd", {}).get("peak_share")
        if share is not None:
            shares[r["name"]] = share
    best_ratio = min(ratios, key=ratios.get) if ratios else None
    best_share = max(shares, key=shares.get) if shares else None
    line = "goals: guided / unguided <= 3x: " + (
        f"best {ratios[best_ratio]:.2f}x ({best_ratio})" if best_ratio else "n/a")
    line += "; decoder bwd >= 40% of peak: " + (
        f"best {100 * shares[best_share]:.1f}% ({best_share})" if best_share else "n/a (no peak known)")
    return {"ratio": ratios, "decoder_bwd_peak_share": shares, "best_ratio": best_ratio,
            "best_share": best_share, "line": line}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print the tables; return (and with ``--json-out`` write) every number as a dict."""
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--sampling"]:
        import sd_cost_sampling

        sd_cost_sampling.main(argv[1:])
        return {}
    args = parse_args(argv)
    spec = SIZES[args.size]
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = resolve_dtype(args.dtype or (spec.dtype if gpu else "fp32"))
    batch = args.batch or (spec.batch if gpu else 2)
    reps, warmup = args.reps or (5 if gpu else 2), args.warmup if args.warmup is not None else (2 if gpu else 1)
    import diffusers

    result: dict = {"size": spec.name, "note": spec.note, "device": torch.cuda.get_device_name(device) if gpu
                    else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
                    "dtype": str(dtype).removeprefix("torch."), "batch": batch, "reps": reps, "warmup": warmup,
                    "signal": args.signal, "weight": args.weight, "torch": torch.__version__,
                    "diffusers": diffusers.__version__, "skipped": {}}

    def save() -> None:
        if args.json_out:  # write then rename: a run stopped by a time limit leaves the last whole file
            out = Path(args.json_out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".part")
            tmp.write_text(json.dumps(result, indent=1))
            tmp.replace(out)

    started = time.perf_counter()
    result["flops"] = flop_table(spec, batch, args.signal)
    save()
    if args.count_only:
        print_flops(result["flops"], None, spec, None)
        print(f"(counted in {time.perf_counter() - started:.0f} s; FLOPs only, nothing timed)")
        return result

    m = build_models(spec, device, dtype, batch)
    print(f"{spec.name}: {spec.note}; {result['device']}, {result['dtype']}, batch {batch}, "
          f"{result['flops']['params']['denoiser'] / 1e6:.0f}M denoiser parameters, built in "
          f"{time.perf_counter() - started:.0f} s")
    point = step_point(spec)
    peak = peak_tflops(device, dtype, args.peak_tflops)
    result["peak_tflops"] = peak
    ctx = dict(point=point, signal=args.signal, weight=args.weight, reps=reps, warmup=warmup,
               peak_override=args.peak_tflops, flops=result["flops"])

    # 1. parts of the baseline step
    base_parts = time_parts(m, plain_path(m), batch, point, args.signal, reps, warmup)
    result["parts"] = parts_row(base_parts, result["flops"]["parts"], batch, peak)
    print_flops(result["flops"], result["parts"], spec, peak)
    save()

    # 2. variants: unguided, full decoder (with / without checkpointing), tiny decoder on the guidance path
    unguided = time_step(m, None, batch, point, args.signal, args.weight, reps, warmup)
    reference = per_image_ms(unguided["seconds"], batch)
    variants = [{"name": "unguided", "step": unguided}]
    result["variants"] = variants
    print()
    print_header(f"guided vs unguided step, batch {batch} (memory: peak allocated during the step)")
    print_row(variants[0], reference)
    plans = [("full decoder", plain_path(m), False)]
    if not args.no_variants:
        plans += [("full decoder, checkpointed", plain_path(m), True),
                  ("tiny decoder (AutoencoderTiny)", plain_path(m, "tiny", surrogate_decode(m.tiny)), False)]
    for name, path, ckpt in plans:
        set_decoder_checkpointing(m.vae, ckpt)
        variants.append({"name": name, "step": time_step(m, path, batch, point, args.signal, args.weight, reps,
                                                         warmup)})
        set_decoder_checkpointing(m.vae, False)
        print_row(variants[-1], reference)
        save()

    # 3. levers, each against the baseline, then all together
    default_attention = attention_processor_name(m.vae)
    result["vae_attention_default"] = default_attention
    levers: list[dict] = [{"name": "baseline", "parts": result["parts"], "step": variants[1]["step"]}]
    result["levers"] = levers
    chosen: dict[str, dict] = {}  # cheap levers first, torch.compile last: a time limit then costs the least
    if args.channels_last:
        chosen["channels-last"] = dict(channels_last=True)
    if args.sdpa_vae:
        if default_attention == "AttnProcessor2_0":  # the default already calls F.scaled_dot_product_attention
            levers[0]["name"] = "baseline (VAE attention: SDPA)"
            chosen["VAE attention without SDPA"] = dict(classic_attention=True)
        else:
            result["skipped"]["sdpa-vae"] = f"default processor {default_attention} is not diffusers' SDPA one"
    if args.bf16_backward:
        if dtype == torch.bfloat16:
            result["skipped"]["bf16-backward"] = "the baseline already runs in bf16"
        else:
            chosen["bf16 guidance path + fp32 fallback"] = dict(bf16=True)
    if args.cuda_graphs:
        if gpu:
            chosen["CUDA graphs"] = dict(cuda_graphs=True)
        else:
            result["skipped"]["cuda-graphs"] = "needs a CUDA device"
    print()
    print_header(f"levers (VAE attention by default: {default_attention}); 'vs ungd': against unguided at batch "
                 f"{batch}, at its own batch for max batch")
    print_row(levers[0], reference)
    if args.max_batch:
        if gpu:
            levers.append(max_batch_row(m, args, ctx))
            result["max_batch"] = levers[-1].pop("search", None)
            print(f"max batch search: {result['max_batch']}", flush=True)
            print_row(levers[-1], reference)
            save()
        else:
            result["skipped"]["max-batch"] = "needs a CUDA device (it searches for the out-of-memory edge)"
    if args.compile:
        chosen["torch.compile"] = dict(compile=True)
    for name, kw in chosen.items():
        levers.append(run_lever(m, name, lambda kw=kw, name=name: lever_path(m, name, **kw), batch, ctx))
        print_row(levers[-1], reference)
        save()
    combined = {k: v for kw in chosen.values() for k, v in kw.items() if k != "classic_attention"}
    if len(combined) > 1:
        levers.append(run_lever(m, "all of them", lambda: lever_path(m, "all", **combined), batch, ctx))
        levers[-1]["levers"] = sorted(combined)
        print_row(levers[-1], reference)
    save()
    for name, why in result["skipped"].items():
        print(f"skipped {name}: {why}")
    result["goals"] = goals(levers, reference)
    print(result["goals"]["line"])
    result["seconds"] = time.perf_counter() - started
    save()
    print(f"(random weights: FLOPs, times and memory are the architecture's; {result['seconds']:.0f} s in all)")
    return result


def quiet() -> None:
    """Silence two harmless messages of a script run (not set on import: tests share the process):
    diffusers' "modules kept in float32" on every dtype cast of a copy, dynamo's note on diffusers'
    cached version checks."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")


if __name__ == "__main__":
    quiet()
    with contextlib.suppress(BrokenPipeError):
        main()
