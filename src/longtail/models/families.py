"""Model families: a diffusers directory's ``model_index.json`` -> the loader that gives the sampler's interface.

Every family loads as a ``LatentDiffusion`` (``longtail.models.ldm``): ``encode_prompts`` (one conditioning
tensor per prompt), ``denoise(z, t, cond)``, ``decode`` / ``encode``, ``scheduler`` (whose class tells
``longtail.sampling.sample`` whether the model predicts noise or a flow velocity), ``latent_shape``.

| family | ``_class_name`` | denoiser | scheduler | status |
| --- | --- | --- | --- | --- |
| ``sd`` | ``StableDiffusionPipeline`` | ``UNet2DConditionModel`` (eps or v) | DDIM / DPM++ / Euler | done |
| ``sdxl`` | ``StableDiffusionXLPipeline`` | ``UNet2DConditionModel`` + pooled text, time ids | DDIM / DPM++ / Euler | done |
| ``sd3`` | ``StableDiffusion3Pipeline`` | ``SD3Transformer2DModel`` (velocity) | ``FlowMatchEulerDiscreteScheduler`` | done |
| ``flux`` | ``FluxPipeline`` | ``FluxTransformer2DModel`` (velocity, packed) | ``FluxFlowMatchScheduler`` | done |
| ``pixart`` | ``PixArtSigmaPipeline`` | ``PixArtTransformer2DModel`` (eps, learned variance) | DDIM / DPM++ / Euler | done |
| ``sana`` | ``SanaPipeline`` | ``SanaTransformer2DModel`` (velocity), ``AutoencoderDC`` | DPM++ (flow) / flow Euler | done |
| PixArt-Alpha, FLUX.2, Qwen-Image, ... | see ``PLANNED`` | | | refused with ``ConfigError`` |

A directory without ``model_index.json`` is read as Stable Diffusion 1.x / 2.x (the layout check names what
is missing). ``FAMILY_DEFAULTS`` holds each family's usual sampling settings (diffusers' pipeline defaults).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import ConfigError
from .ldm import LatentDiffusion, set_decoder_checkpointing

if TYPE_CHECKING:
    from .stable_diffusion import ComponentLoader

logger = logging.getLogger(__name__)

# model_index.json "_class_name" -> family
FAMILIES: dict[str, str] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "StableDiffusionXLPipeline": "sdxl",
    "PixArtSigmaPipeline": "pixart",
    "SanaPipeline": "sana",
}
# Known pipelines the layer does not load yet (ConfigError names them), and what each family is.
PLANNED: dict[str, str] = {
    "Flux2Pipeline": "FLUX.2",
    "PixArtAlphaPipeline": "PixArt-Alpha",
    "QwenImagePipeline": "Qwen-Image",
}
# Per-family sampling defaults (diffusers' pipeline defaults): steps, classifier-free guidance, image size.
FAMILY_DEFAULTS: dict[str, dict[str, float | int]] = {
    "sd": {"num_steps": 50, "cfg_scale": 7.5, "height": 512, "width": 512},
    "sdxl": {"num_steps": 50, "cfg_scale": 5.0, "height": 1024, "width": 1024},
    "sd3": {"num_steps": 28, "cfg_scale": 7.0, "height": 1024, "width": 1024},
    "pixart": {"num_steps": 20, "cfg_scale": 4.5, "height": 1024, "width": 1024},
    "sana": {"num_steps": 20, "cfg_scale": 4.5, "height": 1024, "width": 1024},
    # FLUX.1-dev: distilled guidance 3.5 inside the model (Flux.guidance_scale), no CFG; schnell: 4 steps.
    "flux": {"num_steps": 28, "cfg_scale": 1.0, "guidance_scale": 3.5, "height": 1024, "width": 1024},
}
# SD3 sub-folders: (config file, holds weights); text_encoder_3 / tokenizer_3 are optional (T5).
SD3_LAYOUT: dict[str, tuple[str | None, bool]] = {
    "transformer": ("config.json", True),
    "vae": ("config.json", True),
    "text_encoder": ("config.json", True),
    "text_encoder_2": ("config.json", True),
    "tokenizer": (None, False),
    "tokenizer_2": (None, False),
    "scheduler": ("scheduler_config.json", False),
}
SD3_T5 = {"text_encoder_3": ("config.json", True), "tokenizer_3": (None, False)}
SDXL_LAYOUT: dict[str, tuple[str | None, bool]] = {
    "unet": ("config.json", True),
    "vae": ("config.json", True),
    "text_encoder": ("config.json", True),
    "text_encoder_2": ("config.json", True),
    "tokenizer": (None, False),
    "tokenizer_2": (None, False),
    "scheduler": ("scheduler_config.json", False),
}
PIXART_LAYOUT: dict[str, tuple[str | None, bool]] = {
    "transformer": ("config.json", True),
    "vae": ("config.json", True),
    "text_encoder": ("config.json", True),
    "tokenizer": (None, False),
    "scheduler": ("scheduler_config.json", False),
}
FLUX_LAYOUT: dict[str, tuple[str | None, bool]] = {
    "transformer": ("config.json", True),
    "vae": ("config.json", True),
    "text_encoder": ("config.json", True),
    "text_encoder_2": ("config.json", True),
    "tokenizer": (None, False),
    "tokenizer_2": (None, False),
    "scheduler": ("scheduler_config.json", False),
}


def read_model_index(where: str | Path, local: bool, *, local_files_only: bool = True,
                     revision: str | None = None) -> dict | None:
    """The parsed ``model_index.json`` of a local directory or a cached hub id, or None where there is none.

    Raises ``ConfigError`` naming the file when it is not a JSON object."""
    if local:
        path = Path(where) / "model_index.json"
        if not path.is_file():
            return None
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(where), "model_index.json", revision=revision,
                                        local_files_only=local_files_only))
        except Exception:  # not cached / no network: the component loader gives the clear error
            return None
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is not readable JSON ({err})") from None
    if not isinstance(index, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return index


def detect_family(where: str | Path, local: bool = True, *, local_files_only: bool = True,
                  revision: str | None = None) -> str:
    """The family (a key of ``FAMILY_DEFAULTS``) of a diffusers model, from ``model_index.json``'s ``_class_name``.

    No ``model_index.json``: ``"sd"``. Raises ``ConfigError`` naming the directory and the class for a pipeline
    this layer does not load (planned or unknown)."""
    index = read_model_index(where, local, local_files_only=local_files_only, revision=revision)
    if index is None:
        return "sd"
    name = str(index.get("_class_name", ""))
    if name in FAMILIES:
        return FAMILIES[name]
    if name in PLANNED:
        raise ConfigError(f"{where}: {PLANNED[name]} ({name}) is not supported yet; supported families: "
                          f"{', '.join(sorted(FAMILIES))}")
    raise ConfigError(f"{where}: unknown model family {name or '(no _class_name)'} in model_index.json; "
                      f"supported: {', '.join(sorted(FAMILIES))}")


def family_defaults(model: str | Path | None) -> dict[str, float | int]:
    """``FAMILY_DEFAULTS`` of the family of ``model`` (a local diffusers directory; anything else -- a hub id,
    None -- gets Stable Diffusion's). Raises ``ConfigError`` for an unsupported family (``detect_family``)."""
    path = Path(model).expanduser() if model else None
    family = detect_family(path) if path is not None and path.is_dir() else "sd"
    return dict(FAMILY_DEFAULTS[family])


def check_sd3_layout(root: Path, use_t5: bool = True) -> bool:
    """Raise ``FileNotFoundError`` naming the first missing sub-folder, config or weights of an SD3 directory.

    Returns whether the T5 encoder is to be loaded: ``use_t5`` and ``model_index.json`` lists one (an entry
    of ``[null, null]``, as ``save_pretrained`` writes without T5, means none)."""
    index = read_model_index(root, True) or {}
    entry = index.get("text_encoder_3")
    has_t5 = use_t5 and isinstance(entry, list) and entry[:1] != [None]
    try:
        check_parts(root, {**SD3_LAYOUT, **(SD3_T5 if has_t5 else {})}, "StableDiffusion3Pipeline")
    except FileNotFoundError as err:
        if has_t5 and any(str(err).startswith(str(root / part)) for part in SD3_T5):  # a T5 part is missing
            raise FileNotFoundError(f"{err}; without the T5 encoder set generator.use_t5=false") from None
        raise
    return has_t5


def check_parts(root: Path, layout: dict[str, tuple[str | None, bool]], pipeline: str) -> None:
    """Raise ``FileNotFoundError`` naming the first missing sub-folder, config, weights or tokenizer files of
    ``layout`` (sub-folder -> (config file or None, holds weights)) under ``root``."""
    for part, (config, weights) in layout.items():
        folder = root / part
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing: a {pipeline} directory in the diffusers layout has "
                                    f"{', '.join(f'{p}/' for p in layout)} ({pipeline}.save_pretrained)")
        if config is not None and not (folder / config).is_file():
            raise FileNotFoundError(f"{folder / config} is missing (is {folder} a diffusers {part} folder?)")
        if weights and not any(f.suffix in (".safetensors", ".bin") for f in folder.iterdir()):
            raise FileNotFoundError(f"{folder} has no weights (*.safetensors or *.bin)")
        if not weights and config is None and not any(folder.iterdir()):
            raise FileNotFoundError(f"{folder} is empty (expected tokenizer files)")


def flow_scheduler(name: str, config: dict, where: str | Path, cls: type | None = None) -> object:
    """The family's own flow-matching scheduler (``cls``, default ``FlowMatchEulerDiscreteScheduler``) from its
    config.

    ``name`` is the requested scheduler: ``"ddim"`` (the generic default, meaning "the family's own") or
    ``"euler"`` / ``"flow"`` take it; anything else raises ``ConfigError``. Dynamically shifted configs (the
    shift depends on the resolution) need a ``cls`` that supplies ``mu`` itself (``FluxFlowMatchScheduler``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .flow import FluxFlowMatchScheduler

    cls = cls or FlowMatchEulerDiscreteScheduler
    if name.lower() not in ("ddim", "euler", "flow", "flow-euler"):
        raise ConfigError(f"{where} is a flow-matching model; its scheduler is FlowMatchEulerDiscreteScheduler "
                          f"(scheduler 'euler' or 'flow'), not {name!r}")
    if config.get("use_dynamic_shifting", False) and not issubclass(cls, FluxFlowMatchScheduler):
        raise ConfigError(f"{where}: the scheduler uses resolution-dependent (dynamic) shifting, not supported "
                          "for this family yet")
    return cls.from_config(config)


def refuse_prediction_type(where: str | Path, prediction_type: str | None) -> None:
    """A flow-matching family predicts velocities: ``ConfigError`` for any ``prediction_type``."""
    if prediction_type is not None:
        raise ConfigError(f"{where} is a flow-matching model (velocity); prediction_type={prediction_type!r} "
                          "does not apply")


def noise_scheduler(load: ComponentLoader, name: str, prediction_type: str | None) -> object:
    """A diffusion family's scheduler ``name`` (ddim | dpm++ | euler) from the model's scheduler config;
    ``ConfigError`` naming the model for an unknown name or prediction type."""
    from diffusers import DDIMScheduler

    from .stable_diffusion import make_scheduler

    try:
        return make_scheduler(name, dict(load("scheduler", DDIMScheduler.load_config)), prediction_type)
    except ValueError as err:
        raise ConfigError(f"{load.where}: {err}") from None


def load_sd3(
    where: str | Path,
    local: bool,
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
    t5_max_length: int = 256,
) -> LatentDiffusion:
    """Load SD3 / SD3.5 (``StableDiffusion3Pipeline`` layout) as a ``longtail.models.flow.StableDiffusion3``.

    Arguments as ``load_stable_diffusion``; ``use_t5=False`` leaves out the T5 encoder (zeros in its place,
    as diffusers does; saves its memory), ``t5_max_length`` is the T5 token count (diffusers'
    ``max_sequence_length``). Raises ``FileNotFoundError`` / ``OSError`` / ``ValueError`` naming the missing
    or broken component, ``ConfigError`` for a ``prediction_type`` (flow models predict velocities) or a
    scheduler other than the family's own.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    from .flow import StableDiffusion3
    from .stable_diffusion import ComponentLoader

    refuse_prediction_type(where, prediction_type)
    has_t5 = check_sd3_layout(Path(where), use_t5) if local else use_t5
    load = ComponentLoader(where, local, local_files_only=local_files_only, revision=revision, dtype=dtype,
                           vae_dtype=vae_dtype, variant=variant)
    ldm = StableDiffusion3(
        unet=load.model("transformer", SD3Transformer2DModel),
        vae=load.vae(vae),
        tokenizer=load("tokenizer", AutoTokenizer.from_pretrained),
        text_encoder=load.text_encoder("text_encoder", CLIPTextModelWithProjection),
        tokenizer_2=load("tokenizer_2", AutoTokenizer.from_pretrained),
        text_encoder_2=load.text_encoder("text_encoder_2", CLIPTextModelWithProjection),
        tokenizer_3=load("tokenizer_3", AutoTokenizer.from_pretrained) if has_t5 else None,
        text_encoder_3=load.text_encoder("text_encoder_3", T5EncoderModel) if has_t5 else None,
        scheduler=flow_scheduler(scheduler, dict(load("scheduler", FlowMatchEulerDiscreteScheduler.load_config)),
                                 where),
        t5_max_length=t5_max_length,
    )
    return finish_loading(ldm, device, decoder_checkpointing, height, width)


def finish_loading(ldm: LatentDiffusion, device: str | torch.device, decoder_checkpointing: bool,
                   height: int | None, width: int | None) -> LatentDiffusion:
    """The end of every family's loader: ``ldm`` on ``device`` in eval mode, the VAE decoder checkpointed if
    asked, sampling at ``height`` x ``width`` (None: the model's own size)."""
    ldm.to(device).eval()
    if decoder_checkpointing:
        set_decoder_checkpointing(ldm.vae, True)
    return ldm.set_image_size(height, width)


def load_flux(
    where: str | Path,
    local: bool,
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
    guidance_scale: float = 3.5,
) -> LatentDiffusion:
    """Load FLUX.1 (``FluxPipeline`` layout) as a ``longtail.models.flow.Flux``.

    Arguments as ``load_stable_diffusion``; FLUX needs its T5 encoder (``use_t5=False`` raises
    ``ConfigError``). ``t5_max_length``: T5 tokens (default 512 for dev, 256 for schnell, i.e. a transformer
    without ``guidance_embeds``); ``guidance_scale``: dev's distilled guidance. Errors as ``load_sd3``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    from .flow import Flux, FluxFlowMatchScheduler
    from .stable_diffusion import ComponentLoader

    refuse_prediction_type(where, prediction_type)
    if not use_t5:
        raise ConfigError(f"{where}: FLUX conditions on its T5 encoder only; use_t5=False is not possible")
    if local:
        check_parts(Path(where), FLUX_LAYOUT, "FluxPipeline")
    load = ComponentLoader(where, local, local_files_only=local_files_only, revision=revision, dtype=dtype,
                           vae_dtype=vae_dtype, variant=variant)
    transformer = load.model("transformer", FluxTransformer2DModel)
    if t5_max_length is None:
        t5_max_length = 512 if transformer.config.guidance_embeds else 256
    ldm = Flux(
        unet=transformer,
        vae=load.vae(vae),
        tokenizer=load("tokenizer", AutoTokenizer.from_pretrained),
        text_encoder=load.text_encoder("text_encoder", CLIPTextModel),
        tokenizer_2=load("tokenizer_2", AutoTokenizer.from_pretrained),
        text_encoder_2=load.text_encoder("text_encoder_2", T5EncoderModel),
        scheduler=flow_scheduler(scheduler, dict(load("scheduler", FlowMatchEulerDiscreteScheduler.load_config)),
                                 where, FluxFlowMatchScheduler),
        t5_max_length=t5_max_length,
        guidance_scale=guidance_scale,
    )
    return finish_loading(ldm, device, decoder_checkpointing, height, width)


def load_sdxl(
    where: str | Path,
    local: bool,
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
) -> LatentDiffusion:
    """Load SDXL (``StableDiffusionXLPipeline`` layout) as a ``longtail.models.sdxl.StableDiffusionXL``.

    Arguments as ``load_stable_diffusion`` (``scheduler``: ddim | dpm++ | euler from the model's scheduler
    config; ``use_t5`` does not apply). ``force_zeros_for_empty_prompt`` is read from ``model_index.json``
    (default True). Errors as ``load_sd3``."""
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from .sdxl import StableDiffusionXL
    from .stable_diffusion import ComponentLoader

    if local:
        check_parts(Path(where), SDXL_LAYOUT, "StableDiffusionXLPipeline")
    index = read_model_index(where, local, local_files_only=local_files_only, revision=revision) or {}
    load = ComponentLoader(where, local, local_files_only=local_files_only, revision=revision, dtype=dtype,
                           vae_dtype=vae_dtype, variant=variant)
    ldm = StableDiffusionXL(
        unet=load.model("unet", UNet2DConditionModel),
        vae=load.vae(vae),
        tokenizer=load("tokenizer", AutoTokenizer.from_pretrained),
        text_encoder=load.text_encoder("text_encoder", CLIPTextModel),
        tokenizer_2=load("tokenizer_2", AutoTokenizer.from_pretrained),
        text_encoder_2=load.text_encoder("text_encoder_2", CLIPTextModelWithProjection),
        scheduler=noise_scheduler(load, scheduler, prediction_type),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
    )
    return finish_loading(ldm, device, decoder_checkpointing, height, width)


def load_pixart(
    where: str | Path,
    local: bool,
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
    t5_max_length: int = 300,
) -> LatentDiffusion:
    """Load PixArt-Sigma (``PixArtSigmaPipeline`` layout) as a ``longtail.models.pixart.PixArtSigma``.

    Arguments as ``load_stable_diffusion``; ``t5_max_length``: T5 tokens (300, diffusers' default); its T5 is its
    only text encoder (``use_t5=False`` raises ``ConfigError``). Errors as ``load_sd3``."""
    from diffusers import PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel

    from .pixart import PixArtSigma
    from .stable_diffusion import ComponentLoader

    if not use_t5:
        raise ConfigError(f"{where}: PixArt conditions on its T5 encoder only; use_t5=False is not possible")
    if local:
        check_parts(Path(where), PIXART_LAYOUT, "PixArtSigmaPipeline")
    load = ComponentLoader(where, local, local_files_only=local_files_only, revision=revision, dtype=dtype,
                           vae_dtype=vae_dtype, variant=variant)
    ldm = PixArtSigma(
        unet=load.model("transformer", PixArtTransformer2DModel),
        vae=load.vae(vae),
        tokenizer=load("tokenizer", AutoTokenizer.from_pretrained),
        text_encoder=load.text_encoder("text_encoder", T5EncoderModel),
        scheduler=noise_scheduler(load, scheduler, prediction_type),
        max_length=t5_max_length,
    )
    return finish_loading(ldm, device, decoder_checkpointing, height, width)


def load_sana(
    where: str | Path,
    local: bool,
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
    t5_max_length: int = 300,
) -> LatentDiffusion:
    """Load Sana (``SanaPipeline`` layout) as a ``longtail.models.sana.Sana``.

    ``scheduler``: ``"ddim"`` (the generic default) or ``"dpm++"`` take the model's own flow scheduler class from
    its config (DPM-Solver++ with flow sigmas, or flow Euler); ``"euler"`` / ``"flow"`` a
    ``FlowMatchEulerDiscreteScheduler`` with the config's ``flow_shift``. ``t5_max_length``: Gemma tokens (300).
    ``use_t5`` and ``decoder_checkpointing`` do not apply (``ConfigError`` when set). Errors as ``load_sd3``."""
    import diffusers
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
    from transformers import AutoModel, AutoTokenizer

    from .sana import Sana
    from .stable_diffusion import ComponentLoader

    refuse_prediction_type(where, prediction_type)
    if not use_t5 or decoder_checkpointing:
        raise ConfigError(f"{where}: Sana has no T5 to leave out and its AutoencoderDC no decoder checkpointing")
    if local:
        check_parts(Path(where), PIXART_LAYOUT, "SanaPipeline")
    load = ComponentLoader(where, local, local_files_only=local_files_only, revision=revision, dtype=dtype,
                           vae_dtype=vae_dtype, variant=variant)
    config = dict(load("scheduler", FlowMatchEulerDiscreteScheduler.load_config))
    name = scheduler.lower()
    if name in ("ddim", "dpm++", "default"):
        cls = getattr(diffusers, str(config.get("_class_name", "FlowMatchEulerDiscreteScheduler")), None)
        if cls is None or not hasattr(cls, "from_config"):
            raise ConfigError(f"{where}: unknown scheduler class {config.get('_class_name')!r} in its config")
        sched = cls.from_config(config)
    elif name in ("euler", "flow", "flow-euler"):
        sched = FlowMatchEulerDiscreteScheduler(shift=float(config.get("flow_shift", 3.0) or 3.0))
    else:
        raise ConfigError(f"{where} is a flow-matching model; scheduler must be dpm++ (its own) or euler, "
                          f"not {scheduler!r}")
    ldm = Sana(
        unet=load.model("transformer", SanaTransformer2DModel),
        vae=(AutoencoderDC.from_pretrained(Path(vae), torch_dtype=load.vae_dtype) if vae is not None else
             load.vae(cls=AutoencoderDC)),
        tokenizer=load("tokenizer", AutoTokenizer.from_pretrained),
        text_encoder=load.text_encoder("text_encoder", AutoModel),
        scheduler=sched,
        max_length=t5_max_length,
    )
    return finish_loading(ldm, device, False, height, width)


LOADERS = {"sd3": load_sd3, "flux": load_flux, "sdxl": load_sdxl, "pixart": load_pixart, "sana": load_sana}


def load_family(family: str, where: str | Path, local: bool, **kwargs: object) -> LatentDiffusion:
    """Load a model of ``family`` (not ``"sd"``, which ``load_stable_diffusion`` loads itself).

    Raises ``ConfigError`` for a family without a loader, or a family option (``t5_max_length``,
    ``guidance_scale``) its loader does not take."""
    import inspect

    if family not in LOADERS:
        raise ConfigError(f"{where}: no loader for model family {family!r}")
    loader = LOADERS[family]
    unknown = sorted(set(kwargs) - set(inspect.signature(loader).parameters))
    if unknown:
        raise ConfigError(f"{where} is a {family} model; not an option of it: {', '.join(unknown)}")
    return loader(where, local, **kwargs)


def load_generator(model: str | Path, **kwargs: object) -> LatentDiffusion:
    """Any supported family from a diffusers directory or hub id (``load_stable_diffusion`` under its general
    name; same keyword arguments)."""
    from .stable_diffusion import load_stable_diffusion

    return load_stable_diffusion(model, **kwargs)
