"""Sana as the generator interface the guided sampler uses (a linear-attention DiT trained with flow matching).

``Sana`` is a ``LatentDiffusion`` whose denoiser is a ``SanaTransformer2DModel`` predicting a flow velocity and
whose autoencoder is a deep-compression ``AutoencoderDC`` (32x); its scheduler is the model's own
``DPMSolverMultistepScheduler`` with ``prediction_type="flow_prediction"`` (or ``FlowMatchEulerDiscreteScheduler``),
both flow schedulers to ``longtail.sampling``, which guides the velocity (``guided_velocity``). The text encoder
is Gemma 2 with an attention mask, packed as PixArt's (``longtail.models.pixart.split_masked``).

Not applied (the pipeline's defaults that need a positive / negative distinction or extra packages):
the ``complex_human_instruction`` prompt-enhancement prefix (it goes on positive prompts only, and
``encode_prompts`` encodes positive and negative prompts alike) and ``clean_caption`` (bs4 + ftfy); prompts
are lower-cased and stripped. Equal to ``SanaPipeline(..., complex_human_instruction=None, clean_caption=False)``.
Source: diffusers ``pipeline_sana.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .ldm import LatentDiffusion
from .pixart import encode_masked_prompts, split_masked


@dataclass
class Sana(LatentDiffusion):
    """Sana components plus the glue (``unet`` holds the ``SanaTransformer2DModel``, ``vae`` an ``AutoencoderDC``);
    ``tokenizer`` / ``text_encoder`` are Gemma 2 and ``max_length`` its token count (300)."""

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: ``2 ** (encoder blocks - 1)`` (32 for Sana's DC-AE)."""
        return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)

    def _size_multiple(self) -> int:
        return self.vae_scale_factor * int(self.unet.config.patch_size)

    def _denoiser_name(self) -> str:
        return "transformer patch"

    def denoise(self, z: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Velocity ``[B, c, h, w]`` (float32, as the pipeline) at ``z [B, c, h, w]`` for ``cond [B, L, D + 1]``
        (Gemma states and mask); a learned-variance output's second half is dropped."""
        dtype = self.unet.dtype
        embeds, mask = split_masked(cond)
        timestep = torch.as_tensor(t, device=z.device).expand(z.shape[0]) * self.unet.config.timestep_scale
        out = self.unet(z.to(dtype), encoder_hidden_states=embeds.to(dtype), encoder_attention_mask=mask,
                        timestep=timestep, return_dict=False)[0].float()
        channels = int(self.unet.config.in_channels)
        return out[:, :channels] if out.shape[1] == 2 * channels else out

    def encode(self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images ``[B, C, H, W]`` in [-1, 1] -> scaled latents (``AutoencoderDC`` is deterministic: ``sample``
        and ``generator`` are ignored)."""
        return self.vae.encode(images.to(self.vae.dtype)).latent * self.scaling_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> ``[B, max_length, D + 1]``: Gemma 2's last hidden states and the attention mask (last
        column), right-padded, cached per prompt; ``SanaPipeline.encode_prompt`` without the instruction prefix."""
        self.tokenizer.padding_side = "right"
        return encode_masked_prompts(self, prompts)
