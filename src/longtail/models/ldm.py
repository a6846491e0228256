"""A text-conditioned latent diffusion model as the guided sampler needs it, from diffusers components.

``LatentDiffusion`` holds a ``UNet2DConditionModel``, an ``AutoencoderKL``, a tokenizer + transformers text
encoder and a scheduler, and exposes exactly the callables of ``longtail.sampling.sample``:
``denoise(z_t, t, cond)``, ``decode(z)``, ``encode(images)`` (its inverse, for MPGD manifold projection),
``encode_prompts(prompts)``. Stable Diffusion (CLIP text encoder)
and the embedded default (MiniLM text encoder) are both instances; only their loading differs.

Components may sit in different dtypes (a bf16 UNet with an fp32 VAE, say): ``denoise``, ``decode`` and
``encode`` cast their inputs to the dtype of the module they call. ``latent_size`` overrides the UNet's
``sample_size`` so one model can sample other resolutions (``set_image_size``).

Half precision: a VAE in fp16 can overflow (SDXL's does) and decode to NaN / inf images. ``decode`` checks
and, on a non-finite decode from a half-precision VAE, upcasts the VAE to fp32 for good (as diffusers'
``upcast_vae``), decodes again and notes it in ``decode_fallbacks`` (``longtail.sampling.sample`` copies the
notes into its result, for the manifest).

A prompt longer than the text encoder's ``max_length`` tokens is cut by the tokenizer; ``prompt_seen`` gives
the part the encoder sees and the first encoding of each such prompt logs one warning naming it and the limit
(``longtail.generate.records`` writes both texts to the manifest).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .text_kv import install_text_kv, text_kv_scope

logger = logging.getLogger(__name__)
_warned: set[tuple[int, str]] = set()  # (limit, prompt): each cut prompt is warned about once per process


def shorten(text: str, width: int = 80) -> str:
    """``text`` when it fits in ``width`` characters, else its start and end around an ellipsis."""
    if len(text) <= width:
        return text
    head = (width - 1) * 2 // 3
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


@dataclass
class LatentDiffusion:
    """Diffusers components plus the glue: latent scaling, prompt encoding with a cache, CFG-ready batches."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    tokenizer: object
    text_encoder: nn.Module
    scheduler: DDIMScheduler
    max_length: int = 77
    latent_size: tuple[int, int] | None = None  # (h, w) of sampled latents; None = the UNet's sample_size
    _prompt_cache: dict[str, Tensor] = field(default_factory=dict, repr=False)
    _seen_cache: dict[str, str] = field(default_factory=dict, repr=False)
    decode_fallbacks: list[str] = field(default_factory=list, repr=False)  # what decode had to fall back to

    def __post_init__(self) -> None:
        if isinstance(self.unet, UNet2DConditionModel):  # text keys / values once per sampling call
            install_text_kv(self.unet)

    def sampling_scope(self) -> contextlib.AbstractContextManager:
        """Entered by ``longtail.sampling.sample`` for one call of ``denoise``-s: the UNet may reuse its
        cross-attention text projections meanwhile (``longtail.models.text_kv``)."""
        return text_kv_scope(self.unet)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        """The VAE's latent ``shift_factor`` (SD3, FLUX; 0 for SD 1.x / 2.x, whose config has none)."""
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side: ``2 ** (VAE blocks - 1)`` (8 for Stable Diffusion)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(c, h, w) of the latents to sample: ``latent_size`` when set, else the UNet's ``sample_size``."""
        return (self.unet.config.in_channels, *(self.latent_size or self._default_latent_size()))

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images ``decode`` returns for ``latent_shape``."""
        _, h, w = self.latent_shape
        return (h * self.vae_scale_factor, w * self.vae_scale_factor)

    def set_image_size(self, height: int | None = None, width: int | None = None) -> LatentDiffusion:
        """Sample ``height x width`` images (None: the UNet's default). Both must divide into latent cells
        that the UNet's down-sampling can halve evenly; the error names the nearest valid sizes."""
        if height is None and width is None:
            self.latent_size = None
            return self
        default_h, default_w = self._default_image_size()
        height, width = height or default_h, width or default_w
        f = self.vae_scale_factor
        multiple = self._size_multiple()
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % multiple:
                lower = max(multiple, value // multiple * multiple)
                raise ValueError(
                    f"{name}={value} is not a multiple of {multiple} (VAE factor {f} x {self._denoiser_name()} "
                    f"down-sampling {multiple // f}); try {lower} or {lower + multiple}"
                )
        self.latent_size = (height // f, width // f)
        return self

    def _size_multiple(self) -> int:
        """Image sizes must be multiples of this: VAE factor times the UNet's total down-sampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def _denoiser_name(self) -> str:
        return "UNet"

    def _default_latent_size(self) -> tuple[int, int]:
        size = self.unet.config.sample_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def _default_image_size(self) -> tuple[int, int]:
        h, w = self._default_latent_size()
        return (h * self.vae_scale_factor, w * self.vae_scale_factor)

    def denoise(self, z: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Model output (eps or v, per ``scheduler.config.prediction_type``) for ``z [B, c, h, w]``, text ``[B, L, D]``."""
        dtype = self.unet.dtype
        return self.unet(z.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents ``[B, c, h, w]`` -> images ``[B, C, H, W]`` in the VAE's range (about [-1, 1]).

        ``z / scaling_factor + shift_factor`` goes to the VAE. A non-finite result from a half-precision VAE
        upcasts the VAE to fp32 (``upcast_vae``, noted in ``decode_fallbacks``) and decodes again."""
        images = self._vae_decode(z)
        if self.vae.dtype in (torch.float16, torch.bfloat16) and not bool(torch.isfinite(images).all()):
            self.upcast_vae(f"non-finite {str(self.vae.dtype).removeprefix('torch.')} decode")
            images = self._vae_decode(z)
        return images

    def _vae_decode(self, z: Tensor) -> Tensor:
        latents = z / self.scaling_factor
        if self.shift_factor:
            latents = latents + self.shift_factor
        return self.vae.decode(latents.to(self.vae.dtype)).sample

    def upcast_vae(self, reason: str) -> None:
        """Move the VAE to fp32 for the rest of this model's life, logging and noting ``reason`` once."""
        note = f"vae upcast {str(self.vae.dtype).removeprefix('torch.')}->float32: {reason}"
        self.vae.to(torch.float32)
        self.decode_fallbacks.append(note)
        logger.warning("%s (set the VAE dtype to fp32, or give a fixed fp16 VAE, to avoid the retry)", note)

    def encode(self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images ``[B, C, H, W]`` in [-1, 1] -> scaled latents ``[B, c, h, w]`` (posterior mean unless ``sample``).

        The inverse of ``decode``'s scaling (times ``scaling_factor``), so ``encode(decode(z))`` is the
        autoencoder's projection of ``z``: what ``sample(encode=...)`` needs for ``GuidanceConfig.project``.
        """
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        if self.shift_factor:
            z = z - self.shift_factor
        return z * self.scaling_factor

    def count_tokens(self, prompt: str) -> int:
        """Tokens of ``prompt`` as the encoder counts them against ``max_length`` (special tokens included)."""
        return len(self.tokenizer(prompt, verbose=False)["input_ids"])

    def prompt_seen(self, prompt: str) -> str:
        """The text the encoder sees of ``prompt``: all of it, or, past ``max_length`` tokens, its start (cut
        where the last kept token ends). A cut prompt is warned about once, naming it and the limit."""
        if prompt not in self._seen_cache:
            self._seen_cache[prompt] = self._cut(prompt)
        return self._seen_cache[prompt]

    def _cut(self, prompt: str) -> str:
        n = self.count_tokens(prompt)
        if n <= self.max_length:
            return prompt
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(prompt, truncation=True, max_length=self.max_length, return_offsets_mapping=True)
            seen = prompt[: max(end for _, end in enc["offset_mapping"])].rstrip()
        else:  # slow tokenizers have no offsets: the kept tokens as text
            ids = self.tokenizer(prompt, truncation=True, max_length=self.max_length)["input_ids"]
            seen = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        if (self.max_length, prompt) not in _warned:
            _warned.add((self.max_length, prompt))
            what = (f"never sees {shorten(prompt[len(seen):].strip(), 40)!r}" if prompt.startswith(seen)
                    else f"sees only {shorten(seen)!r}")
            logger.warning("prompt %r is %d tokens, over the text encoder's limit of %d: the generator %s; shorten "
                           "it to use all of it", shorten(prompt), n, self.max_length, what)
        return seen

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> the text encoder's last hidden states ``[B, max_length, D]`` (cached per prompt).

        Prompts over ``max_length`` tokens are cut (``prompt_seen``, which warns once per prompt)."""
        missing = sorted({p for p in prompts if p not in self._prompt_cache})
        for prompt in missing:
            self.prompt_seen(prompt)
        for start in range(0, len(missing), 256):
            chunk = missing[start : start + 256]
            tokens = self.tokenizer(chunk, padding="max_length", max_length=self.max_length, truncation=True,
                                    return_tensors="pt").to(self.text_encoder.device)
            hidden = self.text_encoder(input_ids=tokens["input_ids"]).last_hidden_state
            for prompt, h in zip(chunk, hidden, strict=True):
                self._prompt_cache[prompt] = h.to(self.dtype)
        return torch.stack([self._prompt_cache[p] for p in prompts]).to(self.device)

    def modules(self) -> list[nn.Module]:
        """Every module this generator holds (a family with more text encoders lists them too)."""
        return [self.unet, self.vae, self.text_encoder]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LatentDiffusion:
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in self.modules():
            module.to(**kwargs)
        self._prompt_cache.clear()
        return self

    def eval(self) -> LatentDiffusion:
        for module in self.modules():
            module.eval().requires_grad_(False)
        return self


def set_decoder_checkpointing(vae: AutoencoderKL, enabled: bool = True) -> None:
    """Recompute the VAE decoder's mid and up blocks in the backward pass instead of storing activations.

    diffusers' ``Decoder.forward`` checkpoints when ``torch.is_grad_enabled() and
    self.gradient_checkpointing``: it does not look at ``training``, so it is active in eval mode under
    ``torch.enable_grad()`` (the guidance path) and inactive under ``no_grad`` (final decoding pays nothing).
    Only the decoder's own flag is set, not those of its mid block, so blocks are not checkpointed twice.
    Non-reentrant checkpointing is used: it works with frozen parameters and gives the same gradient.
    """
    decoder = vae.decoder
    if not hasattr(decoder, "gradient_checkpointing"):
        raise ValueError(f"{type(decoder).__name__} has no gradient_checkpointing switch (old diffusers?)")
    decoder._gradient_checkpointing_func = functools.partial(_checkpoint_call, use_reentrant=False)
    decoder.gradient_checkpointing = enabled


def _checkpoint_call(module: nn.Module, *args: object, use_reentrant: bool = False) -> Tensor:
    return checkpoint(module.__call__, *args, use_reentrant=use_reentrant)


def ddim_scheduler(config: dict | None = None) -> DDIMScheduler:
    """A DDIM scheduler for latents: ``clip_sample=False`` always (the latent-collapse trap), SD's betas by default."""
    base = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                set_alpha_to_one=False, steps_offset=1)
    base.update(config or {})
    base.update(clip_sample=False, thresholding=False)
    return DDIMScheduler(**base)
