"""Stable Diffusion XL as the generator interface the guided sampler uses (an eps / v UNet, like SD 1.x / 2.x).

``StableDiffusionXL`` is a ``LatentDiffusion`` whose UNet also takes ``added_cond_kwargs``: the pooled text
embedding of the second text encoder (``text_embeds``) and ``time_ids`` = (original size, crop top-left,
target size) = ``(H, W, 0, 0, H, W)``, computed in ``denoise`` from the latent's size (the pipeline's default
for a plain text-to-image call). Prompt encoding follows diffusers' ``StableDiffusionXLPipeline``: penultimate
hidden states of ``CLIPTextModel`` and ``CLIPTextModelWithProjection`` concatenated, the pooled (projected)
output of the second; with ``force_zeros_for_empty_prompt`` (SDXL base's setting) the empty prompt -- the
default negative prompt -- encodes to zeros, as the pipeline's default ``negative_prompt=None`` does.
Token embeddings and pooled vector travel as one tensor (``longtail.models.flow.pack_cond``).

Half precision: SDXL's VAE overflows in fp16 (its config says ``force_upcast``); ``LatentDiffusion.decode``
upcasts it on a non-finite decode, or load it with ``vae_dtype="fp32"`` or a fixed fp16 VAE (``vae=DIR``).
Source: diffusers ``pipeline_stable_diffusion_xl.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .flow import pack_cond, split_cond
from .ldm import LatentDiffusion


@dataclass
class StableDiffusionXL(LatentDiffusion):
    """SDXL components plus the glue: ``tokenizer`` / ``text_encoder`` (CLIP-L), ``tokenizer_2`` /
    ``text_encoder_2`` (OpenCLIP-G with projection); ``force_zeros_for_empty_prompt`` from ``model_index.json``."""

    tokenizer_2: object = None
    text_encoder_2: nn.Module | None = None
    force_zeros_for_empty_prompt: bool = True

    @property
    def pooled_dim(self) -> int:
        return int(self.text_encoder_2.config.projection_dim)

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2) if m is not None]

    def time_ids(self, height: int, width: int, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """SDXL's micro-conditioning ``[B, 6]``: original size, crop top-left (0, 0), target size, in pixels."""
        return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device).repeat(batch, 1)

    def denoise(self, z: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Model output (eps or v) for ``z [B, c, h, w]`` and packed conditioning ``cond [B, 78, W]``."""
        dtype = self.unet.dtype
        embeds, pooled = split_cond(cond, int(self.unet.config.cross_attention_dim), self.pooled_dim)
        f = self.vae_scale_factor
        time_ids = self.time_ids(z.shape[-2] * f, z.shape[-1] * f, z.shape[0], z.device, embeds.dtype)
        return self.unet(z.to(dtype), t, encoder_hidden_states=embeds.to(dtype),
                         added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids}).sample

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> packed conditioning ``[B, 78, max(D, P)]`` (77 token rows of both encoders' penultimate
        states, then the pooled vector), cached per prompt; the numbers of ``StableDiffusionXLPipeline``."""
        missing = sorted({p for p in prompts if p not in self._prompt_cache})
        for prompt in missing:
            self.prompt_seen(prompt)
        for start in range(0, len(missing), 64):
            chunk = missing[start : start + 64]
            states, pooled = [], None
            for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                ids = tokenizer(chunk, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                                return_tensors="pt").input_ids.to(encoder.device)
                out = encoder(ids, output_hidden_states=True)
                if pooled is None and out[0].ndim == 2:
                    pooled = out[0]
                states.append(out.hidden_states[-2])
            embeds = torch.cat(states, dim=-1).to(self.text_encoder_2.dtype)
            for prompt, e, p in zip(chunk, embeds, pooled, strict=True):
                if prompt == "" and self.force_zeros_for_empty_prompt:
                    e, p = torch.zeros_like(e), torch.zeros_like(p)
                self._prompt_cache[prompt] = pack_cond(e[None], p[None])[0].to(self.dtype)
        return torch.stack([self._prompt_cache[p] for p in prompts]).to(self.device)
