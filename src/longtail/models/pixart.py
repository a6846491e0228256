"""PixArt-Sigma as the generator interface the guided sampler uses (an eps DiT with a learned variance).

``PixArtSigma`` is a ``LatentDiffusion`` whose denoiser is a ``PixArtTransformer2DModel``: it predicts noise
(and, with ``out_channels = 2 x in_channels``, a learned variance, which the sampler does not use: ``denoise``
returns the first half of the channels, as diffusers' pipeline does after classifier-free guidance -- the same
numbers, since CFG is linear per channel). The text encoder is T5 with an attention mask; ``encode_prompts``
packs token embeddings ``[B, L, D]`` and the mask ``[B, L]`` as one tensor ``[B, L, D + 1]`` (the mask as the
last column; ``split_masked``). Prompts are lower-cased and stripped, the pipeline's ``clean_caption=False``
preprocessing (its caption cleaning needs bs4 and ftfy and is not applied). Schedulers: DDIM / DPM++ / Euler
from the model's config (PixArt-Sigma ships DPM-Solver++). Source: diffusers ``pipeline_pixart_sigma.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .ldm import LatentDiffusion


def encode_masked_prompts(ldm: LatentDiffusion, prompts: Sequence[str], cache_dtype: torch.dtype | None = None
                          ) -> Tensor:
    """Prompts -> ``[B, max_length, D + 1]``: the text encoder's last hidden states and the attention mask
    (last column) of the lower-cased, stripped prompts padded to ``ldm.max_length``, cached per prompt in
    ``ldm._prompt_cache`` (in ``cache_dtype``; None keeps the encoder's). PixArt's and Sana's prompt encoding
    (``clean_caption=False``)."""
    missing = sorted({p for p in prompts if p not in ldm._prompt_cache})
    for prompt in missing:
        ldm.prompt_seen(prompt)
    encoder, dtype = ldm.text_encoder, ldm.text_encoder.dtype
    for start in range(0, len(missing), 64):
        chunk = missing[start : start + 64]
        tokens = ldm.tokenizer([p.lower().strip() for p in chunk], padding="max_length", max_length=ldm.max_length,
                               truncation=True, add_special_tokens=True, return_tensors="pt")
        mask = tokens.attention_mask.to(encoder.device)
        hidden = encoder(tokens.input_ids.to(encoder.device), attention_mask=mask)[0]
        packed = torch.cat([hidden.to(dtype), mask[..., None].to(dtype)], -1)
        for prompt, row in zip(chunk, packed, strict=True):
            ldm._prompt_cache[prompt] = row if cache_dtype is None else row.to(cache_dtype)
    return torch.stack([ldm._prompt_cache[p] for p in prompts]).to(ldm.device)


def split_masked(cond: Tensor) -> tuple[Tensor, Tensor]:
    """``[B, L, D + 1]`` -> (token embeddings ``[B, L, D]``, attention mask ``[B, L]``)."""
    return cond[..., :-1], cond[..., -1]


@dataclass
class PixArtSigma(LatentDiffusion):
    """PixArt-Sigma components plus the glue (``unet`` holds the ``PixArtTransformer2DModel``); ``tokenizer`` /
    ``text_encoder`` are T5 and ``max_length`` its token count (300, diffusers' ``max_sequence_length``)."""

    def _size_multiple(self) -> int:
        return self.vae_scale_factor * int(self.unet.config.patch_size)

    def _denoiser_name(self) -> str:
        return "transformer patch"

    def denoise(self, z: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Noise estimate ``[B, c, h, w]`` at ``z [B, c, h, w]`` for packed conditioning ``cond [B, L, D + 1]``;
        a learned-variance output's second half is dropped."""
        dtype = self.unet.dtype
        embeds, mask = split_masked(cond)
        timestep = torch.as_tensor(t, device=z.device)
        timestep = (timestep[None] if timestep.dim() == 0 else timestep).expand(z.shape[0])
        out = self.unet(z.to(dtype), encoder_hidden_states=embeds.to(dtype), encoder_attention_mask=mask,
                        timestep=timestep, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                        return_dict=False)[0]
        channels = int(self.unet.config.in_channels)
        return out[:, :channels] if out.shape[1] == 2 * channels else out

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> ``[B, max_length, D + 1]``: T5's last hidden states and the attention mask (last column),
        cached per prompt; the numbers of ``PixArtSigmaPipeline.encode_prompt`` with ``clean_caption=False``."""
        return encode_masked_prompts(self, prompts, cache_dtype=self.dtype)
