"""Stable Diffusion 1.x / 2.x as a ``LatentDiffusion``: loading a diffusers-layout model or hub id.

``load_stable_diffusion`` is also the entry point for the other families (``longtail.models.families``): it
reads ``model_index.json`` and hands SD3 / SD3.5 directories to their loader, so ``--sd DIR`` takes any of them.

``load_stable_diffusion`` reads a diffusers-layout directory (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) or a hub id and returns the same ``LatentDiffusion`` the embedded default
uses, so ``longtail.generate.generate`` and ``longtail.sampling.sample`` run on it unchanged. The noise
prediction type (epsilon for SD 1.x and 2.x-base, v for SD 2.x 768) comes from the scheduler config; the
sampler converts it. Any scheduler choice is built with ``clip_sample=False``: clipping *latents* to [-1, 1]
collapses samples (``longtail.sampling.check_scheduler`` refuses it).

Per-class prompts live in ``longtail.prompts``, the decoder -> classifier bridge in ``longtail.models.bridge``,
the tiny random-weight model for tests in ``longtail.testing``.

Memory on the guidance path. Longtail guidance backpropagates through the VAE decoder at every guided step;
the paper (A.5) reports 45 GB at batch 8 for SD 1.4 in fp16 at 512 px without gradient checkpointing, most of
it decoder activations (the memory problem of diffusers issue 1883, for which PR 2536 made the decoder
checkpointable). ``decoder_checkpointing=True`` recomputes the decoder's mid and up blocks during the
backward pass (``longtail.models.ldm.set_decoder_checkpointing``; active in eval mode under
``torch.enable_grad()``, inactive under ``no_grad``). Measured on 2 CPU cores (one thread, the other core busy
with another job), float32, one 64x64x4 latent -> 512x512x3 through an ``AutoencoderKL`` decoder with
block_out_channels (32, 64, 64, 64) and 2 layers per block (1.0M decoder parameters; SD's decoder has
about 49M, widths (128, 256, 512, 512)), as peak-RSS growth of a fresh process over a no-grad decode of the
same latent, with ``OMP_NUM_THREADS=1 python benchmarks/surrogate_decoder.py --memory``:

    decode + backward, plain               +1239 MiB   9.0 s
    decode + backward, checkpointing        +695 MiB   9.4 s
    decode + backward, 32-channel surrogate +195 MiB   1.7 s   (``longtail.models.surrogate``)

Checkpointing saves less than half here: each checkpointed segment is a whole up block, and recomputing the
last (full-resolution) block during backward holds its activations again, as do the output norm and conv,
which diffusers leaves outside the checkpoints. The gradient is the same with and without checkpointing
(tests/test_stable_diffusion.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from torch import nn

from ..config import ConfigError
from .ldm import LatentDiffusion, set_decoder_checkpointing

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCHEDULERS = ("ddim", "dpm++", "euler")
# Sub-folders of the diffusers layout and the file each must hold.
LAYOUT: dict[str, str | None] = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": None,
    "scheduler": "scheduler_config.json",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# --- loading ------------------------------------------------------------------------------------------------


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp32" | "fp16" | "bf16"`` (or a ``torch.dtype``) -> ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}") from None


def make_scheduler(name: str, config: Mapping[str, object], prediction_type: str | None = None) -> object:
    """A ``ddim`` | ``dpm++`` | ``euler`` scheduler from a (Stable Diffusion) scheduler config.

    Betas, timestep spacing and ``prediction_type`` come from ``config`` (``prediction_type`` overrides it);
    sample clipping and thresholding are always off (they are meant for pixel-space models).
    """
    base = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    base.update(clip_sample=False, thresholding=False)
    if prediction_type is not None:
        base["prediction_type"] = prediction_type
    key = name.lower().replace("_", "").replace("-", "")
    if key == "ddim":
        return DDIMScheduler.from_config(base)
    if key in ("dpm++", "dpmpp", "dpmsolver++", "dpmsolver"):
        return DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++")
    if key == "euler":
        return EulerDiscreteScheduler.from_config(base)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {list(SCHEDULERS)}")


def _source(model: str | Path) -> tuple[str | Path, bool]:
    """``(location, is_local)``: an existing directory, else something that reads as a hub id ``org/name``."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path, True
    if path.is_file():
        raise ValueError(
            f"{path} is a file; load_stable_diffusion needs a directory in the diffusers layout "
            "(unet/, vae/, text_encoder/, tokenizer/, scheduler/). Convert a single-file checkpoint once "
            "with StableDiffusionPipeline.from_single_file(...).save_pretrained(<dir>)"
        )
    text = str(model)
    if isinstance(model, str) and _HUB_ID.fullmatch(text) and not text.startswith((".", "~")):
        return text, False
    raise FileNotFoundError(
        f"no diffusers model directory at {path} (and {text!r} is not a hub id 'org/name')"
    )


def check_layout(root: Path) -> None:
    """Raise ``FileNotFoundError`` naming the first missing sub-folder, config or weights of a local model."""
    for part, config in LAYOUT.items():
        folder = root / part
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} is missing: a Stable Diffusion directory in the diffusers layout has "
                f"{', '.join(f'{p}/' for p in LAYOUT)} "
                "(write one with StableDiffusionPipeline.save_pretrained)"
                + ("" if (root / "model_index.json").is_file() else
                   f"; {root} also has no model_index.json, which names the pipeline of other families "
                   "(SDXL, SD3, FLUX, PixArt, Sana): copy the model's whole directory")
            )
        if config is not None and not (folder / config).is_file():
            raise FileNotFoundError(f"{folder / config} is missing (is {folder} a diffusers {part} folder?)")
        if part in ("unet", "vae", "text_encoder") and not any(
            f.suffix in (".safetensors", ".bin") for f in folder.iterdir()
        ):
            raise FileNotFoundError(f"{folder} has no weights (*.safetensors or *.bin)")
        if part == "tokenizer" and not any(folder.iterdir()):
            raise FileNotFoundError(
                f"{folder} is empty (expected tokenizer files such as vocab.json, merges.txt)"
            )


class ComponentLoader:
    """Loads the components of one diffusers-layout model, local directory or hub id, with errors that name
    the component and where it was looked for (``OSError`` / ``ValueError``; a hub id not in the local cache
    says how to download it). ``dtype`` is the weights' dtype, ``vae_dtype`` the VAE's (default ``dtype``),
    ``variant`` the weights files' variant (``"fp16"``: ``*.fp16.safetensors``)."""

    def __init__(self, where: str | Path, local: bool, *, local_files_only: bool = True,
                 revision: str | None = None, dtype: str | torch.dtype = "fp32",
                 vae_dtype: str | torch.dtype | None = None, variant: str | None = None) -> None:
        self.where, self.local, self.local_files_only = where, local, local_files_only
        self.hub = {} if local else {"local_files_only": local_files_only, "revision": revision}
        self.dtype = resolve_dtype(dtype)
        self.vae_dtype = resolve_dtype(vae_dtype) if vae_dtype is not None else self.dtype
        self.variant = variant
        self.weights = {"variant": variant} if variant else {}

    def model(self, name: str, cls: type) -> object:
        """A diffusers model (``cls.from_pretrained``) from sub-folder ``name``, in ``dtype``."""
        return self(name, cls.from_pretrained, torch_dtype=self.dtype, **self.weights)

    def text_encoder(self, name: str, cls: type) -> object:
        """A transformers model (``cls.from_pretrained``) from sub-folder ``name``, in ``dtype``."""
        return self(name, cls.from_pretrained, dtype=self.dtype)

    def vae(self, override: str | Path | None = None, cls: type = AutoencoderKL) -> object:
        """The VAE from sub-folder ``vae``, or from the directory ``override`` (``load_vae``), in ``vae_dtype``."""
        if override is not None:
            return load_vae(override, self.vae_dtype, self.variant)
        return self("vae", cls.from_pretrained, torch_dtype=self.vae_dtype, **self.weights)

    def part(self, name: str) -> tuple[str | Path, dict]:
        """(path, extra keyword arguments) of sub-folder ``name``."""
        if self.local:
            return Path(self.where) / name, {}
        return self.where, {"subfolder": name, **self.hub}

    def __call__(self, name: str, loader: Callable[..., object], **kw: object) -> object:
        """Run one component's loader (``Model.from_pretrained`` or ``Scheduler.load_config``)."""
        path, extra = self.part(name)
        shown = path if self.local else f"{self.where} (subfolder {name})"
        try:
            return loader(path, **extra, **kw)
        except OSError as err:
            if not self.local and self.local_files_only:
                raise OSError(
                    f"{self.where!r} is not a local directory and its {name} is not in the Hugging Face "
                    f"cache; pass local_files_only=False to download it, or give a local path ({err})"
                ) from err
            raise OSError(f"could not load the {name} from {shown}: {err}") from err
        except (ValueError, KeyError, RuntimeError, TypeError) as err:
            raise ValueError(f"could not load the {name} from {shown}: {err}") from err


def load_vae(path: str | Path, dtype: torch.dtype, variant: str | None = None) -> AutoencoderKL:
    """A replacement ``AutoencoderKL`` from its own directory (e.g. a fixed fp16 VAE); errors name ``path``."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'config.json'} is missing: the VAE override must be a diffusers "
                                "AutoencoderKL directory (config.json + weights)")
    kw = {"variant": variant} if variant else {}
    try:
        return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, **kw)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        raise ValueError(f"could not load the VAE override from {folder}: {err}") from err


def load_stable_diffusion(
    model: str | Path,
    *,
    dtype: str | torch.dtype = "fp32",
    vae_dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    scheduler: str = "ddim",
    prediction_type: str | None = None,
    height: int | None = None,
    width: int | None = None,
    local_files_only: bool = True,
    decoder_checkpointing: bool = False,
    revision: str | None = None,
    variant: str | None = None,
    vae: str | Path | None = None,
    use_t5: bool = True,
    t5_max_length: int | None = None,
    guidance_scale: float | None = None,
) -> LatentDiffusion:
    """Load a diffusers-layout text-to-image model as a ``LatentDiffusion`` in eval mode with frozen weights.

    The family comes from the directory's ``model_index.json`` (``longtail.models.families``): Stable
    Diffusion 1.x / 2.x load here; SD3 / SD3.5 (``StableDiffusion3Pipeline``) load as a
    ``longtail.models.flow.StableDiffusion3`` (``use_t5=False`` skips its T5 encoder), SDXL, FLUX.1 and
    PixArt-Sigma likewise (``FAMILY_DEFAULTS`` there has each family's usual steps and CFG); other families
    raise ``ConfigError`` naming the directory and its ``_class_name``. ``t5_max_length`` (T5 tokens: SD3,
    FLUX, PixArt) and ``guidance_scale`` (FLUX.1-dev's distilled guidance) go to the families that have them
    (``ConfigError`` for others); None keeps the family's default.

    ``model``: a local directory in the diffusers layout or a hub id (only the local cache unless
    ``local_files_only=False``). ``dtype`` applies to UNet, VAE and text encoder; ``vae_dtype`` overrides it
    for the VAE (keep the decoder in fp32 where fp16 overflows); ``vae`` replaces the VAE by one from another
    directory (a fixed fp16 VAE). ``height``/``width`` set the sampled image size (default: the UNet's
    ``sample_size`` times the VAE factor, 512 for SD 1.x). ``decoder_checkpointing`` trades decoder
    recomputation for activation memory on the guidance path.
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as tlog

    from .families import detect_family, load_family

    tlog.disable_progress_bar()
    where, local = _source(model)
    family = detect_family(where, local, local_files_only=local_files_only, revision=revision)
    extra = {k: v for k, v in (("t5_max_length", t5_max_length), ("guidance_scale", guidance_scale)) if v is not None}
    if family != "sd":
        return load_family(family, where, local, dtype=dtype, vae_dtype=vae_dtype, device=device,
                           scheduler=scheduler, prediction_type=prediction_type, height=height, width=width,
                           local_files_only=local_files_only, decoder_checkpointing=decoder_checkpointing,
                           revision=revision, variant=variant, vae=vae, use_t5=use_t5, **extra)
    if extra:
        raise ConfigError(f"{where} is Stable Diffusion 1.x / 2.x; not an option of it: {', '.join(sorted(extra))}")
    if local:
        check_layout(Path(where))
    load = ComponentLoader(where, local, local_files_only=local_files_only, revision=revision, dtype=dtype,
                           vae_dtype=vae_dtype, variant=variant)
    unet = load.model("unet", UNet2DConditionModel)
    autoencoder = load.vae(vae)
    text_encoder = load.text_encoder("text_encoder", AutoModel)
    tokenizer = load("tokenizer", AutoTokenizer.from_pretrained)
    sched_config = load("scheduler", DDIMScheduler.load_config)
    ldm = LatentDiffusion(
        unet=unet,
        vae=autoencoder,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        scheduler=make_scheduler(scheduler, sched_config, prediction_type),
        max_length=_max_length(tokenizer, text_encoder),
    )
    ldm.to(device).eval()
    _check_text_encoder(ldm, where)
    if decoder_checkpointing:
        set_decoder_checkpointing(ldm.vae, True)
    return ldm.set_image_size(height, width)


def _max_length(tokenizer: object, text_encoder: nn.Module) -> int:
    """Token length of prompts: the tokenizer's ``model_max_length`` unless it is a "no limit" sentinel."""
    n = int(getattr(tokenizer, "model_max_length", 0) or 0)
    if 0 < n <= 4096:
        return n
    return int(getattr(text_encoder.config, "max_position_embeddings", 77))


def _check_text_encoder(ldm: LatentDiffusion, where: str | Path) -> None:
    """The text encoder must give ``last_hidden_state`` whose width is the UNet's cross-attention width."""
    try:
        hidden = ldm.encode_prompts([""])  # stays cached: the empty prompt is the default negative prompt
    except AttributeError as err:
        raise ValueError(
            f"{where}: the text encoder {type(ldm.text_encoder).__name__} returns no last_hidden_state "
            f"({err})"
        ) from err
    want = ldm.unet.config.cross_attention_dim
    if isinstance(want, int) and hidden.shape[-1] != want:
        raise ValueError(
            f"{where}: text encoder width {hidden.shape[-1]} != UNet cross_attention_dim {want} "
            "(mixed components?)"
        )
