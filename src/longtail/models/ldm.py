"""A text-conditioned latent diffusion model as the guided sampler needs it, from diffusers components.

``LatentDiffusion`` holds a ``UNet2DConditionModel``, an ``AutoencoderKL``, a tokenizer + transformers text
encoder and a scheduler, and exposes exactly the callables of ``longtail.sampling.sample``:
``denoise(z_t, t, cond)``, ``decode(z)``, ``encode_prompts(prompts)``. Stable Diffusion (CLIP text encoder)
and the embedded default (MiniLM text encoder) are both instances; only their loading differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import Tensor, nn


@dataclass
class LatentDiffusion:
    """Diffusers components plus the glue: latent scaling, prompt encoding with a cache, CFG-ready batches."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    tokenizer: object
    text_encoder: nn.Module
    scheduler: DDIMScheduler
    max_length: int = 77
    _prompt_cache: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, *size)

    def denoise(self, z: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Model output (eps or v, per ``scheduler.config.prediction_type``) for ``z [B, c, h, w]``, text ``[B, L, D]``."""
        return self.unet(z, t, encoder_hidden_states=cond).sample

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents ``[B, c, h, w]`` -> images ``[B, C, H, W]`` in the VAE's range (about [-1, 1])."""
        return self.vae.decode(z / self.scaling_factor).sample

    def encode(self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images ``[B, C, H, W]`` in [-1, 1] -> scaled latents (posterior mean unless ``sample``)."""
        dist = self.vae.encode(images).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return z * self.scaling_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> the text encoder's last hidden states ``[B, max_length, D]`` (cached per prompt)."""
        missing = sorted({p for p in prompts if p not in self._prompt_cache})
        for start in range(0, len(missing), 256):
            chunk = missing[start : start + 256]
            tokens = self.tokenizer(chunk, padding="max_length", max_length=self.max_length, truncation=True,
                                    return_tensors="pt").to(self.text_encoder.device)
            hidden = self.text_encoder(input_ids=tokens["input_ids"]).last_hidden_state
            for prompt, h in zip(chunk, hidden, strict=True):
                self._prompt_cache[prompt] = h.to(self.dtype)
        return torch.stack([self._prompt_cache[p] for p in prompts]).to(self.device)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LatentDiffusion:
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device, dtype=dtype)
        self._prompt_cache.clear()
        return self

    def eval(self) -> LatentDiffusion:
        for module in (self.unet, self.vae, self.text_encoder):
            module.eval().requires_grad_(False)
        return self


def ddim_scheduler(config: dict | None = None) -> DDIMScheduler:
    """A DDIM scheduler for latents: ``clip_sample=False`` always (the latent-collapse trap), SD's betas by default."""
    base = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                set_alpha_to_one=False, steps_offset=1)
    base.update(config or {})
    base.update(clip_sample=False, thresholding=False)
    return DDIMScheduler(**base)
