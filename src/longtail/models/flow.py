"""Flow-matching families (SD3 / SD3.5, FLUX.1) as the generator interface the guided sampler uses.

``StableDiffusion3`` is a ``LatentDiffusion`` whose denoiser is an ``SD3Transformer2DModel`` predicting a
velocity on ``x_s = (1 - s) x0 + s n`` and whose scheduler is diffusers' ``FlowMatchEulerDiscreteScheduler``;
``longtail.sampling.sample`` sees the scheduler is a flow one and guides the velocity
(``longtail.guidance.guided_velocity``). Prompt encoding follows diffusers' ``StableDiffusion3Pipeline``
exactly: two CLIP text encoders with projection (penultimate hidden states, concatenated and zero-padded to
the T5 width; pooled outputs concatenated) and a T5 encoder, optional (zeros in its place when absent, as the
pipeline does with ``text_encoder_3=None``).

One conditioning tensor. ``generate`` and ``sample`` pass a prompt's conditioning around as one tensor
(concatenated for CFG, indexed, moved). SD3 needs two: token embeddings ``[B, L, D]`` (D =
``joint_attention_dim``) and a pooled vector ``[B, P]`` (P = ``pooled_projection_dim``). ``encode_prompts``
packs them as ``[B, L + 1, max(D, P)]``: the L token rows, then the pooled vector as a last row, each zero
padded on the right; ``split_cond`` unpacks. Source: diffusers 0.3x ``pipeline_stable_diffusion_3.py``.

``Flux`` (FLUX.1 dev / schnell): a ``FluxTransformer2DModel`` on 2x2-packed latents. The sampler and the guide
see ordinary ``[B, c, h, w]`` latents (so low-pass filtering and views work as for any model); ``denoise``
packs them for the transformer and unpacks its velocity. Conditioning: T5 token embeddings and CLIP's pooled
output (``pack_cond``); dev's distilled guidance (``guidance_scale``, a transformer input) replaces CFG
(``cfg_scale = 1``; a larger ``cfg_scale`` with a negative prompt is FluxPipeline's ``true_cfg_scale``). The
schedule (``sigmas = linspace(1, 1/n, n)`` shifted by ``mu`` from the image's token count) is baked into
``FluxFlowMatchScheduler``, so ``sample`` needs no extra argument. Source: diffusers ``pipeline_flux.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor, nn

from .ldm import LatentDiffusion


def pack_cond(embeds: Tensor, pooled: Tensor) -> Tensor:
    """Token embeddings ``[B, L, D]`` and pooled vectors ``[B, P]`` -> one tensor ``[B, L + 1, max(D, P)]``."""
    width = max(embeds.shape[-1], pooled.shape[-1])
    rows = nn.functional.pad(embeds, (0, width - embeds.shape[-1]))
    last = nn.functional.pad(pooled, (0, width - pooled.shape[-1])).unsqueeze(1)
    return torch.cat([rows, last.to(rows.dtype)], dim=1)


def split_cond(cond: Tensor, embed_dim: int, pooled_dim: int) -> tuple[Tensor, Tensor]:
    """Inverse of ``pack_cond``: ``[B, L + 1, W]`` -> (``[B, L, embed_dim]``, ``[B, pooled_dim]``)."""
    return cond[:, :-1, :embed_dim], cond[:, -1, :pooled_dim]


@dataclass
class StableDiffusion3(LatentDiffusion):
    """SD3 / SD3.5 components plus the glue (``unet`` holds the ``SD3Transformer2DModel``; ``transformer`` too).

    ``tokenizer`` / ``text_encoder`` are the first CLIP pair (CLIP-L), ``tokenizer_2`` / ``text_encoder_2`` the
    second (CLIP-G), ``tokenizer_3`` / ``text_encoder_3`` the T5 pair (None: no T5, zeros in its place).
    ``max_length`` is CLIP's token limit (77), ``t5_max_length`` T5's (``max_sequence_length``, 256 in diffusers).
    Token counting and cut-prompt warnings (``prompt_seen``) follow the CLIP limit: CLIP-L and CLIP-G see only
    the first ``max_length`` tokens, even where T5 sees more.
    """

    tokenizer_2: object = None
    text_encoder_2: nn.Module | None = None
    tokenizer_3: object = None
    text_encoder_3: nn.Module | None = None
    t5_max_length: int = 256

    @property
    def transformer(self) -> nn.Module:
        return self.unet

    @property
    def embed_dim(self) -> int:
        return int(self.unet.config.joint_attention_dim)

    @property
    def pooled_dim(self) -> int:
        return int(self.unet.config.pooled_projection_dim)

    def _size_multiple(self) -> int:
        return self.vae_scale_factor * int(self.unet.config.patch_size)

    def _denoiser_name(self) -> str:
        return "transformer patch"

    def modules(self) -> list[nn.Module]:
        """Every module this generator holds (the T5 encoder only when present)."""
        parts = [self.unet, self.vae, self.text_encoder, self.text_encoder_2, self.text_encoder_3]
        return [m for m in parts if m is not None]

    def denoise(self, z: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Velocity ``[B, c, h, w]`` at latents ``z [B, c, h, w]``, timestep ``t`` (``sigma * 1000``, a scalar or
        ``[B]``) and packed conditioning ``cond [B, L + 1, W]`` (``encode_prompts``)."""
        dtype = self.unet.dtype
        embeds, pooled = split_cond(cond, self.embed_dim, self.pooled_dim)
        timestep = torch.as_tensor(t, device=z.device).expand(z.shape[0])
        return self.unet(hidden_states=z.to(dtype), timestep=timestep, encoder_hidden_states=embeds.to(dtype),
                         pooled_projections=pooled.to(dtype), return_dict=False)[0]

    def _clip(self, prompts: list[str], tokenizer: object, encoder: nn.Module) -> tuple[Tensor, Tensor]:
        """One CLIP encoder: penultimate hidden states ``[B, 77, d]`` and projected pooled output ``[B, p]``."""
        ids = tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                        return_tensors="pt").input_ids.to(encoder.device)
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2].to(self.text_encoder.dtype), out[0]

    def _t5(self, prompts: list[str]) -> Tensor:
        """T5 last hidden states ``[B, t5_max_length, D]``, or zeros of that shape without a T5 encoder."""
        if self.text_encoder_3 is None:
            return torch.zeros(len(prompts), self.t5_max_length, self.embed_dim, device=self.text_encoder.device,
                               dtype=self.text_encoder.dtype)
        ids = self.tokenizer_3(prompts, padding="max_length", max_length=self.t5_max_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids
        return self.text_encoder_3(ids.to(self.text_encoder_3.device))[0].to(self.text_encoder_3.dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> packed conditioning ``[B, L + 1, max(D, P)]`` (``pack_cond``; L = 77 + ``t5_max_length``),
        cached per prompt; the same numbers as ``StableDiffusion3Pipeline.encode_prompt`` (clip_skip None)."""
        missing = sorted({p for p in prompts if p not in self._prompt_cache})
        for prompt in missing:
            self.prompt_seen(prompt)
        for start in range(0, len(missing), 64):
            chunk = missing[start : start + 64]
            embed_1, pooled_1 = self._clip(chunk, self.tokenizer, self.text_encoder)
            embed_2, pooled_2 = self._clip(chunk, self.tokenizer_2, self.text_encoder_2)
            t5 = self._t5(chunk)
            clip = torch.cat([embed_1, embed_2], dim=-1)
            clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            packed = pack_cond(torch.cat([clip, t5], dim=-2), torch.cat([pooled_1, pooled_2], dim=-1))
            for prompt, row in zip(chunk, packed, strict=True):
                self._prompt_cache[prompt] = row.to(self.dtype)
        return torch.stack([self._prompt_cache[p] for p in prompts]).to(self.device)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift ``mu``: linear in the image's token count between
    (``base_seq_len``, ``base_shift``) and (``max_seq_len``, ``max_shift``) (diffusers ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


class FluxFlowMatchScheduler(FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` with FluxPipeline's schedule as its default: ``set_timesteps(n)``
    uses ``sigmas = linspace(1, 1/n, n)`` (unless the config has ``use_flow_sigmas``) and, with dynamic
    shifting, ``mu = calculate_shift(image_seq_len, ...)`` from the config's shift range. ``image_seq_len``
    (the packed image's token count) is set by the generator whenever its image size changes."""

    image_seq_len: int = 4096

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | None = None, mu: float | None = None,
                      timesteps: list[float] | None = None) -> None:
        if sigmas is None and timesteps is None and not self.config.get("use_flow_sigmas", False):
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if mu is None and self.config.get("use_dynamic_shifting", False):
            c = self.config
            mu = calculate_shift(self.image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                 c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        super().set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)


def pack_latents(z: Tensor) -> Tensor:
    """``[B, c, h, w]`` -> FLUX's 2x2 patches ``[B, (h/2)(w/2), 4c]`` (diffusers ``FluxPipeline._pack_latents``)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """Inverse of ``pack_latents``: ``[B, (h/2)(w/2), 4c]`` -> ``[B, c, h, w]``."""
    b, _, channels = x.shape
    return x.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, channels // 4, h, w)


def latent_image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """FLUX's position ids ``[(h/2)(w/2), 3]`` of the packed latent: (0, row, column) per patch."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@dataclass
class Flux(LatentDiffusion):
    """FLUX.1 components plus the glue (``unet`` holds the ``FluxTransformer2DModel``; ``transformer`` too).

    ``tokenizer`` / ``text_encoder``: CLIP (``CLIPTextModel``, its pooled output); ``tokenizer_2`` /
    ``text_encoder_2``: T5 (token embeddings, ``t5_max_length`` tokens, 512 for dev, 256 for schnell).
    ``guidance_scale``: the distilled guidance given to a transformer with ``guidance_embeds`` (dev); unused
    otherwise (schnell). Latents ``[16, h, w]`` unpacked; default image size 1024 (128 latent cells times the
    VAE factor, as FluxPipeline). Token counting follows CLIP's 77 (``prompt_seen``)."""

    tokenizer_2: object = None
    text_encoder_2: nn.Module | None = None
    t5_max_length: int = 512
    guidance_scale: float = 3.5
    default_sample_size: int = 128

    def __post_init__(self) -> None:
        self._sync_schedule()

    @property
    def transformer(self) -> nn.Module:
        return self.unet

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (int(self.unet.config.in_channels) // 4, *(self.latent_size or self._default_latent_size()))

    def _default_latent_size(self) -> tuple[int, int]:
        side = 2 * (self.default_sample_size * self.vae_scale_factor // (self.vae_scale_factor * 2))
        return (side, side)

    def _size_multiple(self) -> int:
        return self.vae_scale_factor * 2

    def _denoiser_name(self) -> str:
        return "2x2 latent packing"

    def set_image_size(self, height: int | None = None, width: int | None = None) -> Flux:
        super().set_image_size(height, width)
        self._sync_schedule()
        return self

    def _sync_schedule(self) -> None:
        """Tell the scheduler the packed token count of the current size (FLUX's shift depends on it)."""
        if isinstance(self.scheduler, FluxFlowMatchScheduler):
            _, h, w = self.latent_shape
            self.scheduler.image_seq_len = (h // 2) * (w // 2)

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2) if m is not None]

    def denoise(self, z: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Velocity ``[B, c, h, w]`` at latents ``z [B, c, h, w]``, timestep ``t`` (``sigma * 1000``) and packed
        conditioning ``cond [B, L + 1, W]``; the transformer runs on 2x2-packed latents."""
        dtype = self.unet.dtype
        b, _, h, w = z.shape
        embeds, pooled = split_cond(cond, int(self.unet.config.joint_attention_dim),
                                    int(self.unet.config.pooled_projection_dim))
        timestep = torch.as_tensor(t, device=z.device).expand(b).to(z.dtype)
        guidance = None
        if self.unet.config.guidance_embeds:
            guidance = torch.full([1], self.guidance_scale, device=z.device, dtype=torch.float32).expand(b)
        ids_dtype = self.text_encoder.dtype
        out = self.unet(hidden_states=pack_latents(z).to(dtype), timestep=timestep / 1000, guidance=guidance,
                        pooled_projections=pooled.to(dtype), encoder_hidden_states=embeds.to(dtype),
                        txt_ids=torch.zeros(embeds.shape[1], 3, device=z.device, dtype=ids_dtype),
                        img_ids=latent_image_ids(h, w, z.device, ids_dtype), return_dict=False)[0]
        return unpack_latents(out, h, w)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> packed conditioning ``[B, t5_max_length + 1, max(D, P)]`` (T5 tokens, CLIP pooled), cached
        per prompt; the same numbers as ``FluxPipeline.encode_prompt``."""
        missing = sorted({p for p in prompts if p not in self._prompt_cache})
        for prompt in missing:
            self.prompt_seen(prompt)
        for start in range(0, len(missing), 64):
            chunk = missing[start : start + 64]
            ids = self.tokenizer(chunk, padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="pt").input_ids.to(self.text_encoder.device)
            pooled = self.text_encoder(ids, output_hidden_states=False).pooler_output.to(self.text_encoder.dtype)
            ids_2 = self.tokenizer_2(chunk, padding="max_length", max_length=self.t5_max_length, truncation=True,
                                     return_tensors="pt").input_ids.to(self.text_encoder_2.device)
            embeds = self.text_encoder_2(ids_2, output_hidden_states=False)[0].to(self.text_encoder_2.dtype)
            for prompt, row in zip(chunk, pack_cond(embeds, pooled), strict=True):
                self._prompt_cache[prompt] = row.to(self.dtype)
        return torch.stack([self._prompt_cache[p] for p in prompts]).to(self.device)
