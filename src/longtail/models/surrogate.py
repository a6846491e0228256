"""Cheap decoders for the guidance path only (final images always come from the full VAE decoder).

Most of LTG's cost is the backward pass through the VAE decoder at every guided step (paper A.5: 6.3x slower
than unguided sampling, 45 GB at batch 8). The guidance gradient only needs a decoder whose output, and so
whose input-gradient, is close to the full one, so a small decoder can stand in for it there:

* ``load_tiny_autoencoder(path)``: a TAESD checkpoint (diffusers ``AutoencoderTiny``) as a decode callable.
  Scaling convention (diffusers' ``AutoencoderTiny`` source and the TAESD author in madebyollin/taesd#3):
  TAESD maps the diffusion model's latents *as the UNet sees them* (already multiplied by SD's 0.18215)
  straight to an image; its config's ``scaling_factor`` is 1.0, so the pipelines' ``latents / scaling_factor``
  leaves them unchanged. Its ``DecoderTiny`` soft-clamps latents to +-3 (``3 tanh(z / 3)``) and returns
  images in [-1, 1] (it maps its [0, 1] output with ``2x - 1``), the same range as ``AutoencoderKL``.
* ``distill_decoder(ldm, images_or_latents)``: trains a small decoder (``DecoderTiny`` blocks with few
  channels, or a plain conv stack) to match ``ldm.decode`` on the user's own latents, also on perturbed and
  predicted-clean latents, because guidance decodes Eq. 8's ``z0_hat``, which is off the data manifold
  early in sampling. Saved as ``surrogate.safetensors`` + ``surrogate.json``.

``surrogate_decode(module)`` wraps either as the ``guide_decode=`` callable of ``longtail.sampling.sample``
(and ``longtail.generate.generate``). Its input is the sampler's latent, i.e. the UNet's scaled latent space.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..files import read_state_dict, write_json
from ..guidance import eps_from_model_output, predicted_z0
from .ldm import LatentDiffusion

CONFIG_FILE = "surrogate.json"
WEIGHTS_FILE = "surrogate.safetensors"
ARCHS = ("taesd", "conv")


@dataclass
class SurrogateConfig:
    """A distilled decoder's shape: ``upsample`` x2 stages (log2 of the VAE factor), ``channels`` wide."""

    arch: str = "taesd"
    latent_channels: int = 4
    out_channels: int = 3
    upsample: int = 3
    channels: int = 32
    blocks: int = 1  # blocks per resolution stage

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown surrogate arch {self.arch!r}; choose one of {list(ARCHS)}")


def _conv_stack(cfg: SurrogateConfig) -> nn.Sequential:
    """conv -> [blocks x (conv, SiLU), x2 nearest upsample] per stage -> conv to image channels."""
    layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, cfg.channels, 3, padding=1), nn.SiLU()]
    for stage in range(cfg.upsample + 1):
        for _ in range(cfg.blocks):
            layers += [nn.Conv2d(cfg.channels, cfg.channels, 3, padding=1), nn.SiLU()]
        if stage < cfg.upsample:
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
    layers.append(nn.Conv2d(cfg.channels, cfg.out_channels, 3, padding=1))
    return nn.Sequential(*layers)


class SurrogateDecoder(nn.Module):
    """Scaled latents ``[B, c, h, w]`` -> images ``[B, C, h * 2^u, w * 2^u]`` in about [-1, 1].

    ``arch="taesd"`` is diffusers' ``DecoderTiny`` (TAESD's decoder: soft clamp, ReLU residual blocks, nearest
    upsampling) at ``channels`` width; ``arch="conv"`` is a plain conv + SiLU stack.
    """

    def __init__(self, config: SurrogateConfig) -> None:
        super().__init__()
        self.config = config
        n = config.upsample + 1
        if config.arch == "taesd":
            from diffusers.models.autoencoders.vae import DecoderTiny

            self.net = DecoderTiny(
                in_channels=config.latent_channels,
                out_channels=config.out_channels,
                num_blocks=(config.blocks,) * n,
                block_out_channels=(config.channels,) * n,
                upsampling_scaling_factor=2,
                act_fn="relu",
                upsample_fn="nearest",
            )
        else:
            self.net = _conv_stack(config)
        self.stats: dict[str, float] = {}

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


def surrogate_config_for(
    ldm: LatentDiffusion, arch: str = "taesd", channels: int = 32, blocks: int = 1
) -> SurrogateConfig:
    """A surrogate shaped like ``ldm``'s VAE: same latent and image channels, same up-sampling factor."""
    return SurrogateConfig(
        arch=arch,
        latent_channels=int(ldm.vae.config.latent_channels),
        out_channels=int(ldm.vae.config.out_channels),
        upsample=int(math.log2(ldm.vae_scale_factor)),
        channels=channels,
        blocks=blocks,
    )


class GuideDecoder(nn.Module):
    """``decode(z) = module(z / scaling_factor)``: sampler latents -> images, for ``guide_decode=``.

    ``module`` is a ``SurrogateDecoder``, an ``AutoencoderTiny`` / ``AutoencoderKL`` (their
    ``decode(...).sample``) or any module mapping latents to images. Inputs are cast to the module's dtype;
    outputs are left as they come.
    """

    def __init__(self, module: nn.Module, scaling_factor: float = 1.0) -> None:
        super().__init__()
        self.module = module
        self.scaling_factor = float(scaling_factor)

    def forward(self, z: Tensor) -> Tensor:
        param = next(self.module.parameters(), None)
        z = z / self.scaling_factor
        if param is not None:
            z = z.to(param.dtype)
        decode = getattr(self.module, "decode", None)
        return decode(z).sample if callable(decode) else self.module(z)


def surrogate_decode(module: nn.Module, scaling_factor: float | None = None) -> GuideDecoder:
    """The ``guide_decode`` callable for ``module``.

    ``scaling_factor`` divides the sampler's latents first. Default: the module's own
    ``config.scaling_factor`` (1.0 for TAESD, SD's 0.18215 for an ``AutoencoderKL``), else 1.0 (a
    ``SurrogateDecoder`` is trained on the sampler's latents directly).
    """
    if scaling_factor is None:
        config = getattr(module, "config", None)
        scaling_factor = float(getattr(config, "scaling_factor", 1.0)) if config is not None else 1.0
    return GuideDecoder(module, scaling_factor).eval().requires_grad_(False)


def load_tiny_autoencoder(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    local_files_only: bool = True,
) -> GuideDecoder:
    """A TAESD (``AutoencoderTiny``) directory or hub id -> its decoder as a ``guide_decode`` callable."""
    from diffusers import AutoencoderTiny

    local = Path(path).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise FileNotFoundError(
            f"{local / 'config.json'} is missing (expected a diffusers AutoencoderTiny folder)"
        )
    source = local if local.exists() else str(path)
    try:
        taesd = AutoencoderTiny.from_pretrained(source, torch_dtype=dtype, local_files_only=local_files_only)
    except OSError as err:
        raise OSError(f"could not load a tiny autoencoder from {path}: {err}") from err
    return surrogate_decode(taesd.to(device))


# --- distillation -------------------------------------------------------------------------------------------


@dataclass
class DistillConfig:
    """How ``distill_decoder`` trains. Latent perturbations: per sample, Gaussian noise of std drawn from
    U(0, noise_std) (the latents are in the UNet's unit-scale space); ``predicted_fraction`` of each batch
    comes from a pool of Eq. 8 predicted clean latents, ``z0_hat`` of the UNet at uniformly drawn timesteps.

    ``jacobian_weight > 0`` adds a finite-difference Jacobian term: for a random latent direction ``u`` of
    unit RMS, the surrogate's change ``S(z + h u) - S(z)`` must match the full decoder's
    (``h = jacobian_step``). Over random ``u`` this is the Frobenius distance of the two Jacobians, which
    bounds the error of every guidance gradient ``J^T v``; it costs one more decode of each batch."""

    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    arch: str = "taesd"
    channels: int = 32
    blocks: int = 1
    noise_std: float = 0.5
    predicted_fraction: float = 0.25
    pool_size: int = 256
    jacobian_weight: float = 1.0
    jacobian_step: float = 0.1
    seed: int = 0


@torch.no_grad()
def encode_latents(ldm: LatentDiffusion, images: Tensor, batch_size: int = 32) -> Tensor:
    """Images ``[N, C, H, W]`` in [-1, 1] -> scaled posterior-mean latents ``[N, c, h, w]`` (float32, CPU)."""
    out = [ldm.encode(x.to(ldm.device)).float().cpu() for x in images.split(batch_size)]
    return torch.cat(out)


@torch.no_grad()
def predicted_clean_pool(
    ldm: LatentDiffusion, latents: Tensor, size: int, generator: torch.Generator, batch_size: int = 32
) -> Tensor:
    """``size`` Eq. 8 predictions ``z0_hat`` of noised ``latents`` at uniform timesteps (empty prompt)."""
    alphas = ldm.scheduler.alphas_cumprod.float()
    prediction_type = ldm.scheduler.config.get("prediction_type", "epsilon")
    idx = torch.randint(0, len(latents), (size,), generator=generator)
    t = torch.randint(0, len(alphas), (size,), generator=generator)
    noise = torch.randn((size, *latents.shape[1:]), generator=generator)
    pool = []
    for chunk in torch.arange(size).split(batch_size):
        a = alphas[t[chunk]].view(-1, 1, 1, 1)
        z_t = a.sqrt() * latents[idx[chunk]] + (1 - a).sqrt() * noise[chunk]
        cond = ldm.encode_prompts([""] * len(chunk))
        dev = ldm.device
        out = ldm.denoise(z_t.to(dev), t[chunk].to(dev), cond).float().cpu()
        eps = eps_from_model_output(out, z_t, a, prediction_type)
        pool.append(predicted_z0(z_t, eps, a))
    return torch.cat(pool)


@torch.no_grad()
def reconstruction_error(
    ldm: LatentDiffusion, decode: Callable[[Tensor], Tensor], latents: Tensor, batch_size: int = 32
) -> float:
    """Mean squared difference between ``decode`` and the full decoder ``ldm.decode`` over ``latents``."""
    total, count = 0.0, 0
    for z in latents.split(batch_size):
        z = z.to(ldm.device, ldm.dtype)
        diff = decode(z).float() - ldm.decode(z).float()
        total += float(diff.pow(2).sum())
        count += diff.numel()
    return total / max(1, count)


def _as_latents(ldm: LatentDiffusion, data: Tensor, kind: str) -> Tensor:
    if kind == "auto":
        c = data.shape[1]
        kind = (
            "latents" if c == ldm.vae.config.latent_channels and c != ldm.vae.config.in_channels else "images"
        )
    if kind == "images":
        return encode_latents(ldm, data)
    if kind == "latents":
        return data.float().cpu()
    raise ValueError(f"kind must be 'auto', 'images' or 'latents', got {kind!r}")


def distill_decoder(
    ldm: LatentDiffusion,
    data: Tensor,
    *,
    kind: str = "auto",
    steps: int = 1000,
    batch_size: int = 16,
    lr: float = 1e-3,
    arch: str = "taesd",
    channels: int = 32,
    blocks: int = 1,
    noise_std: float = 0.5,
    predicted_fraction: float = 0.25,
    pool_size: int = 256,
    jacobian_weight: float = 1.0,
    jacobian_step: float = 0.1,
    seed: int = 0,
    show: bool = False,
) -> SurrogateDecoder:
    """Train a small decoder to reproduce ``ldm.decode`` (MSE on images), frozen and in eval mode on return.

    ``data``: images ``[N, C, H, W]`` in [-1, 1] (encoded to posterior means) or scaled latents
    ``[N, c, h, w]``;
    ``kind="auto"`` tells them apart by channel count. Each step draws a batch of clean latents (a
    ``predicted_fraction`` of it from the predicted-clean pool), adds Gaussian noise of a per-sample std in
    ``[0, noise_std]``, and regresses the surrogate on the full decoder's output (plus the Jacobian term of
    ``DistillConfig`` when ``jacobian_weight > 0``). ``module.stats`` records the error before and after
    training on held-out perturbed latents.
    """
    cfg = DistillConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        arch=arch,
        channels=channels,
        blocks=blocks,
        noise_std=noise_std,
        predicted_fraction=predicted_fraction,
        pool_size=pool_size,
        jacobian_weight=jacobian_weight,
        jacobian_step=jacobian_step,
        seed=seed,
    )
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    latents = _as_latents(ldm, data, kind)
    pool = (
        predicted_clean_pool(ldm, latents, pool_size, gen)
        if predicted_fraction > 0 and pool_size > 0
        else None
    )
    module = SurrogateDecoder(surrogate_config_for(ldm, arch, channels, blocks)).to(ldm.device)
    held_out = _batch(latents, pool, cfg, gen, n=min(64, 4 * batch_size))
    before = reconstruction_error(ldm, module, held_out, batch_size)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    module.train()
    for _ in tqdm(range(steps), desc="distill decoder", disable=not show, leave=False):
        z = _batch(latents, pool, cfg, gen, n=batch_size).to(ldm.device)
        loss = _distill_loss(ldm, module, z, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    module.eval().requires_grad_(False)
    after = reconstruction_error(ldm, module, held_out, batch_size)
    module.stats = {
        "mse_before": before,
        "mse_after": after,
        "final_loss": float(loss.detach()) if steps else before,
        "train_latents": len(latents),
        "steps": steps,
    }
    module.distill = asdict(cfg)
    return module


def _distill_loss(
    ldm: LatentDiffusion, module: nn.Module, z: Tensor, cfg: DistillConfig, gen: torch.Generator
) -> Tensor:
    """Output MSE to the full decoder, plus the finite-difference Jacobian term when it is weighted."""
    n = len(z)
    if cfg.jacobian_weight > 0:
        u = torch.randn(z.shape, generator=gen).to(z.device)
        u = u / u.flatten(1).pow(2).mean(dim=1).sqrt().view(-1, 1, 1, 1)
        z = torch.cat([z, z + cfg.jacobian_step * u])
    with torch.no_grad():
        target = ldm.decode(z.to(ldm.dtype)).float()
    pred = module(z)
    loss = F.mse_loss(pred[:n], target[:n])
    if cfg.jacobian_weight > 0:
        d_pred, d_target = (
            (pred[n:] - pred[:n]) / cfg.jacobian_step,
            (target[n:] - target[:n]) / cfg.jacobian_step,
        )
        loss = loss + cfg.jacobian_weight * F.mse_loss(d_pred, d_target)
    return loss


def _batch(latents: Tensor, pool: Tensor | None, cfg: DistillConfig, gen: torch.Generator, n: int) -> Tensor:
    """``n`` training latents: clean or predicted-clean, plus per-sample Gaussian noise."""
    z = latents[torch.randint(0, len(latents), (n,), generator=gen)]
    if pool is not None:
        take = torch.rand(n, generator=gen) < cfg.predicted_fraction
        z = torch.where(take.view(-1, 1, 1, 1), pool[torch.randint(0, len(pool), (n,), generator=gen)], z)
    scale = torch.rand(n, 1, 1, 1, generator=gen) * cfg.noise_std
    return z + scale * torch.randn(z.shape, generator=gen)


# --- files --------------------------------------------------------------------------------------------------


def save_surrogate(module: SurrogateDecoder, path: str | Path) -> Path:
    """Write ``surrogate.safetensors`` and ``surrogate.json`` (architecture, training stats) into ``path``."""
    from safetensors.torch import save_file

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(root / WEIGHTS_FILE)
    )
    meta = {
        "format": 1,
        "config": asdict(module.config),
        "stats": module.stats,
        "distill": getattr(module, "distill", None),
        "input": "the sampler's (UNet's scaled) latents; output images in [-1, 1]",
    }
    write_json(root / CONFIG_FILE, meta)
    return root


def load_surrogate(path: str | Path, device: str | torch.device = "cpu") -> SurrogateDecoder:
    """Read a decoder written by ``save_surrogate``; frozen, eval mode."""
    root = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"{root / name} is missing (not a surrogate decoder written by save_surrogate?)"
            )
    meta = json.loads((root / CONFIG_FILE).read_text())
    module = SurrogateDecoder(SurrogateConfig(**meta["config"]))
    module.load_state_dict(read_state_dict(root / WEIGHTS_FILE, "surrogate decoder weights"))
    module.stats = meta.get("stats", {})
    return module.to(device).eval().requires_grad_(False)
